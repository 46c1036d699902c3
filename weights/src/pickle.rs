//! A Python pickle reader (protocols 0 to 5) that never executes anything.
//!
//! `pickle.load` in Python is a small stack machine whose `GLOBAL` + `REDUCE`
//! opcodes import and call arbitrary callables, which is how a malicious
//! `.pt` file runs code. This machine runs the same opcodes but only builds
//! data: a `GLOBAL module name` becomes the inert [`Obj::Global`], `REDUCE`
//! records [`Obj::Call`] (callable + arguments), `NEWOBJ`/`NEWOBJ_EX`/`OBJ`/
//! `INST` record [`Obj::Object`], `BUILD` stores the state in the record and
//! persistent ids become [`Obj::PersistentId`]. There is no code path that
//! calls or imports anything: giving meaning to a few well-known globals (torch
//! tensor rebuilds, `OrderedDict`, `set`) is left to the caller walking the
//! result (see `pth`), which interprets an allowlist and treats everything
//! else as plain data.
//!
//! Containers and constructed objects live in an arena ([`Pickle::objs`]) and
//! are referenced by index ([`Value::Ref`]). Pickles share and mutate objects
//! through the memo (an object is memoized, then filled by `SETITEMS` or
//! `BUILD`), and an arena keeps that sharing exact without reference cycles or
//! recursive drops, whatever the nesting depth of hostile input.
//!
//! Resource use is bounded: every length is checked against the bytes left
//! before anything is allocated, and [`Limits`] caps the stack, the mark
//! depth, the memo and the number of objects.

use std::collections::HashMap;
use std::sync::Arc;

/// Index of an object in [`Pickle::objs`].
pub type ObjId = usize;

/// A pickled value. Scalars are inline; everything that can be shared or
/// mutated is an arena reference.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit an `i64`: little-endian two's complement.
    BigInt(Arc<[u8]>),
    Float(f64),
    Str(Arc<str>),
    Bytes(Arc<[u8]>),
    Ref(ObjId),
}

/// An object built by the pickle, never a live Python object.
#[derive(Debug, Clone, PartialEq)]
pub enum Obj {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    FrozenSet(Vec<Value>),
    /// `GLOBAL` / `STACK_GLOBAL` / `INST` reference: a name, nothing imported.
    Global {
        module: String,
        name: String,
    },
    /// `REDUCE`: the call `callable(*args)` as data; it is never made.
    Call(Box<Instance>),
    /// `NEWOBJ`, `NEWOBJ_EX`, `OBJ`, `INST`: `cls.__new__(cls, *args)` as data.
    Object(Box<Instance>),
    /// `PERSID` / `BINPERSID`: an external reference (torch storages).
    PersistentId(Value),
}

/// What a `REDUCE` or `NEWOBJ` would have built, with what the pickle later
/// did to it (`BUILD`, `APPEND(S)`, `SETITEM(S)`, `ADDITEMS`).
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The function (`REDUCE`) or class (`NEWOBJ`), normally a [`Obj::Global`].
    pub callable: Value,
    /// The positional arguments, normally a tuple.
    pub args: Value,
    /// `NEWOBJ_EX` keyword arguments.
    pub kwargs: Option<Value>,
    /// The last `BUILD` state (for a Python object: its `__dict__`).
    pub state: Option<Value>,
    /// Items appended (`APPEND(S)`) or added (`ADDITEMS`).
    pub list_items: Vec<Value>,
    /// Items set (`SETITEM(S)`), e.g. the entries of an `OrderedDict`.
    pub dict_items: Vec<(Value, Value)>,
}

/// Errors of the pickle machine. They never leave partial state behind.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PickleError {
    #[error("unexpected end of pickle data at byte {pos}")]
    Truncated { pos: usize },
    #[error("unknown opcode 0x{op:02x} at byte {pos}")]
    UnknownOpcode { op: u8, pos: usize },
    #[error("unsupported pickle feature at byte {pos}: {what}")]
    Unsupported { pos: usize, what: String },
    #[error("malformed pickle at byte {pos}: {what}")]
    Malformed { pos: usize, what: String },
    #[error("pickle exceeds the {what} limit ({limit}) at byte {pos}")]
    Limit {
        pos: usize,
        what: &'static str,
        limit: usize,
    },
}

/// Caps on what one pickle may make the machine hold. The defaults are far
/// above what real checkpoints need (a YOLOv8x `data.pkl` holds a few tens of
/// thousands of objects) and keep hostile input to a few hundred MiB at most.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_stack: usize,
    pub max_marks: usize,
    pub max_memo: usize,
    pub max_objects: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stack: 1 << 20,
            max_marks: 10_000,
            max_memo: 1 << 20,
            max_objects: 1 << 21,
        }
    }
}

/// The result of one pickle: the root value and the arena it refers to.
#[derive(Debug, Clone)]
pub struct Pickle {
    pub root: Value,
    /// The objects, in creation order (so in the order the pickle wrote them).
    pub objs: Vec<Obj>,
    /// Bytes read, up to and including `STOP`.
    pub consumed: usize,
}

/// Reads one pickle from the start of `data` (trailing bytes are left for the
/// caller: legacy torch files are several pickles back to back).
pub fn load(data: &[u8]) -> Result<Pickle, PickleError> {
    load_with_limits(data, &Limits::default())
}

pub fn load_with_limits(data: &[u8], limits: &Limits) -> Result<Pickle, PickleError> {
    Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objs: Vec::new(),
        limits: *limits,
    }
    .run()
}

// Opcodes, from the pickle format (Lib/pickletools.py documents each one).
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const FLOAT: u8 = b'F';
    pub const INT: u8 = b'I';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const PERSID: u8 = b'P';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const STRING: u8 = b'S';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const UNICODE: u8 = b'V';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const INST: u8 = b'i';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const OBJ: u8 = b'o';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    // protocol 2
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const EXT1: u8 = 0x82;
    pub const EXT2: u8 = 0x83;
    pub const EXT4: u8 = 0x84;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    // protocol 3
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    // protocol 4
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    // protocol 5
    pub const BYTEARRAY8: u8 = 0x96;
    pub const NEXT_BUFFER: u8 = 0x97;
    pub const READONLY_BUFFER: u8 = 0x98;
}

/// Longest decimal integer accepted by the text opcodes (the conversion to
/// bytes is quadratic in the digit count).
const MAX_DECIMAL_DIGITS: usize = 4096;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each `MARK` (Python keeps a stack of stacks; this is
    /// the same thing without copying).
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    objs: Vec<Obj>,
    limits: Limits,
}

impl<'a> Machine<'a> {
    fn run(mut self) -> Result<Pickle, PickleError> {
        loop {
            let at = self.pos;
            let code = self.byte()?;
            match code {
                op::STOP => {
                    let root = self.pop(at)?;
                    return Ok(Pickle {
                        root,
                        objs: self.objs,
                        consumed: self.pos,
                    });
                }
                op::PROTO => {
                    let v = self.byte()?;
                    if v > 5 {
                        return Err(PickleError::Unsupported {
                            pos: at,
                            what: format!("pickle protocol {v}"),
                        });
                    }
                }
                // Framing only groups opcodes for buffered reads; the content
                // is the same opcode stream, so the length is just skipped.
                op::FRAME => {
                    self.take(8)?;
                }
                op::MARK => {
                    if self.marks.len() >= self.limits.max_marks {
                        return Err(self.limit(at, "mark depth", self.limits.max_marks));
                    }
                    self.marks.push(self.stack.len());
                }
                op::POP => {
                    if self.stack.len() > self.frame_start() {
                        self.stack.pop();
                    } else if self.marks.pop().is_none() {
                        return Err(underflow(at));
                    }
                }
                op::POP_MARK => {
                    self.pop_mark(at)?;
                }
                op::DUP => {
                    let top = self.top(at)?.clone();
                    self.push(at, top)?;
                }
                op::NONE => self.push(at, Value::None)?,
                op::NEWTRUE => self.push(at, Value::Bool(true))?,
                op::NEWFALSE => self.push(at, Value::Bool(false))?,
                op::BININT => {
                    let b = self.array::<4>()?;
                    self.push(at, Value::Int(i32::from_le_bytes(b) as i64))?;
                }
                op::BININT1 => {
                    let b = self.byte()?;
                    self.push(at, Value::Int(b as i64))?;
                }
                op::BININT2 => {
                    let b = self.array::<2>()?;
                    self.push(at, Value::Int(u16::from_le_bytes(b) as i64))?;
                }
                op::LONG1 => {
                    let n = self.byte()? as usize;
                    let v = int_from_le(self.take(n)?);
                    self.push(at, v)?;
                }
                op::LONG4 => {
                    let n = i32::from_le_bytes(self.array::<4>()?);
                    if n < 0 {
                        return Err(malformed(at, "negative LONG4 length"));
                    }
                    let v = int_from_le(self.take(n as usize)?);
                    self.push(at, v)?;
                }
                op::INT => {
                    let line = self.line()?;
                    // Protocol 0 spells booleans as INT 00 / 01.
                    let v = match line {
                        b"00" => Value::Bool(false),
                        b"01" => Value::Bool(true),
                        _ => parse_decimal(line).ok_or_else(|| malformed(at, "bad INT"))?,
                    };
                    self.push(at, v)?;
                }
                op::LONG => {
                    let line = self.line()?;
                    let digits = line.strip_suffix(b"L").unwrap_or(line);
                    let v = parse_decimal(digits).ok_or_else(|| malformed(at, "bad LONG"))?;
                    self.push(at, v)?;
                }
                op::FLOAT => {
                    let line = self.line()?;
                    let v = std::str::from_utf8(line)
                        .ok()
                        .and_then(|s| s.trim().parse::<f64>().ok())
                        .ok_or_else(|| malformed(at, "bad FLOAT"))?;
                    self.push(at, Value::Float(v))?;
                }
                op::BINFLOAT => {
                    let b = self.array::<8>()?;
                    self.push(at, Value::Float(f64::from_be_bytes(b)))?;
                }
                op::BINUNICODE => {
                    let n = u32::from_le_bytes(self.array::<4>()?) as u64;
                    let s = self.utf8(n)?;
                    self.push(at, s)?;
                }
                op::SHORT_BINUNICODE => {
                    let n = self.byte()? as u64;
                    let s = self.utf8(n)?;
                    self.push(at, s)?;
                }
                op::BINUNICODE8 => {
                    let n = u64::from_le_bytes(self.array::<8>()?);
                    let s = self.utf8(n)?;
                    self.push(at, s)?;
                }
                op::UNICODE => {
                    let line = self.line()?;
                    let s =
                        raw_unicode_unescape(line).ok_or_else(|| malformed(at, "bad UNICODE"))?;
                    self.push(at, Value::Str(s.into()))?;
                }
                // Python 2 `str`: decoded as text, as torch does (encoding
                // utf-8); invalid sequences become U+FFFD.
                op::BINSTRING => {
                    let n = i32::from_le_bytes(self.array::<4>()?);
                    if n < 0 {
                        return Err(malformed(at, "negative BINSTRING length"));
                    }
                    let b = self.take(n as usize)?;
                    self.push(at, Value::Str(String::from_utf8_lossy(b).into()))?;
                }
                op::SHORT_BINSTRING => {
                    let n = self.byte()? as usize;
                    let b = self.take(n)?;
                    self.push(at, Value::Str(String::from_utf8_lossy(b).into()))?;
                }
                op::STRING => {
                    let line = self.line()?;
                    let b = string_unescape(line).ok_or_else(|| malformed(at, "bad STRING"))?;
                    self.push(at, Value::Str(String::from_utf8_lossy(&b).into()))?;
                }
                op::BINBYTES => {
                    let n = u32::from_le_bytes(self.array::<4>()?) as u64;
                    let b = self.take_u64(n)?;
                    self.push(at, Value::Bytes(b.into()))?;
                }
                op::SHORT_BINBYTES => {
                    let n = self.byte()? as u64;
                    let b = self.take_u64(n)?;
                    self.push(at, Value::Bytes(b.into()))?;
                }
                op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = u64::from_le_bytes(self.array::<8>()?);
                    let b = self.take_u64(n)?;
                    self.push(at, Value::Bytes(b.into()))?;
                }
                op::NEXT_BUFFER => {
                    return Err(PickleError::Unsupported {
                        pos: at,
                        what: "out-of-band buffers (NEXT_BUFFER)".into(),
                    })
                }
                op::READONLY_BUFFER => {
                    self.top(at)?;
                }
                op::EMPTY_TUPLE => self.push_obj(at, Obj::Tuple(Vec::new()))?,
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = (code - op::TUPLE1 + 1) as usize;
                    if self.stack.len() < self.frame_start() + n {
                        return Err(underflow(at));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push_obj(at, Obj::Tuple(items))?;
                }
                op::TUPLE => {
                    let items = self.pop_mark(at)?;
                    self.push_obj(at, Obj::Tuple(items))?;
                }
                op::EMPTY_LIST => self.push_obj(at, Obj::List(Vec::new()))?,
                op::LIST => {
                    let items = self.pop_mark(at)?;
                    self.push_obj(at, Obj::List(items))?;
                }
                op::EMPTY_DICT => self.push_obj(at, Obj::Dict(Vec::new()))?,
                op::DICT => {
                    let items = self.pop_mark(at)?;
                    let pairs = pairs(at, items)?;
                    self.push_obj(at, Obj::Dict(pairs))?;
                }
                op::EMPTY_SET => self.push_obj(at, Obj::Set(Vec::new()))?,
                op::FROZENSET => {
                    let items = self.pop_mark(at)?;
                    self.push_obj(at, Obj::FrozenSet(items))?;
                }
                op::APPEND => {
                    let v = self.pop(at)?;
                    self.extend_list(at, vec![v])?;
                }
                op::APPENDS | op::ADDITEMS => {
                    let items = self.pop_mark(at)?;
                    self.extend_list(at, items)?;
                }
                op::SETITEM => {
                    let v = self.pop(at)?;
                    let k = self.pop(at)?;
                    self.extend_dict(at, vec![(k, v)])?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark(at)?;
                    let pairs = pairs(at, items)?;
                    self.extend_dict(at, pairs)?;
                }
                op::GLOBAL => {
                    let module = self.text_line(at)?;
                    let name = self.text_line(at)?;
                    let g = global(module, name);
                    self.push_obj(at, g)?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop(at)?;
                    let module = self.pop(at)?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.push_obj(at, global(m.to_string(), n.to_string()))?
                        }
                        _ => return Err(malformed(at, "STACK_GLOBAL needs two strings")),
                    }
                }
                op::REDUCE => {
                    let args = self.pop(at)?;
                    let callable = self.pop(at)?;
                    self.push_obj(at, Obj::Call(Box::new(Instance::new(callable, args, None))))?;
                }
                op::NEWOBJ => {
                    let args = self.pop(at)?;
                    let cls = self.pop(at)?;
                    self.push_obj(at, Obj::Object(Box::new(Instance::new(cls, args, None))))?;
                }
                op::NEWOBJ_EX => {
                    let kwargs = self.pop(at)?;
                    let args = self.pop(at)?;
                    let cls = self.pop(at)?;
                    let inst = Instance::new(cls, args, Some(kwargs));
                    self.push_obj(at, Obj::Object(Box::new(inst)))?;
                }
                op::OBJ => {
                    let mut items = self.pop_mark(at)?;
                    if items.is_empty() {
                        return Err(malformed(at, "OBJ without a class"));
                    }
                    let rest = items.split_off(1);
                    let cls = items.pop().unwrap_or(Value::None);
                    let args = self.new_obj(at, Obj::Tuple(rest))?;
                    self.push_obj(at, Obj::Object(Box::new(Instance::new(cls, args, None))))?;
                }
                op::INST => {
                    let module = self.text_line(at)?;
                    let name = self.text_line(at)?;
                    let items = self.pop_mark(at)?;
                    let cls = self.new_obj(at, global(module, name))?;
                    let args = self.new_obj(at, Obj::Tuple(items))?;
                    self.push_obj(at, Obj::Object(Box::new(Instance::new(cls, args, None))))?;
                }
                op::BUILD => {
                    let state = self.pop(at)?;
                    match self.top(at)? {
                        Value::Ref(id) => {
                            let id = *id;
                            match &mut self.objs[id] {
                                Obj::Call(inst) | Obj::Object(inst) => inst.state = Some(state),
                                _ => return Err(malformed(at, "BUILD on a non-object")),
                            }
                        }
                        _ => return Err(malformed(at, "BUILD on a non-object")),
                    }
                }
                op::PERSID => {
                    let pid = self.text_line(at)?;
                    self.push_obj(at, Obj::PersistentId(Value::Str(pid.into())))?;
                }
                op::BINPERSID => {
                    let pid = self.pop(at)?;
                    self.push_obj(at, Obj::PersistentId(pid))?;
                }
                op::PUT => {
                    let line = self.line()?;
                    let key = parse_memo_key(line).ok_or_else(|| malformed(at, "bad PUT"))?;
                    self.memo_put(at, key)?;
                }
                op::BINPUT => {
                    let key = self.byte()? as u32;
                    self.memo_put(at, key)?;
                }
                op::LONG_BINPUT => {
                    let key = u32::from_le_bytes(self.array::<4>()?);
                    self.memo_put(at, key)?;
                }
                op::MEMOIZE => {
                    let key = u32::try_from(self.memo.len())
                        .map_err(|_| self.limit(at, "memo", self.limits.max_memo))?;
                    self.memo_put(at, key)?;
                }
                op::GET => {
                    let line = self.line()?;
                    let key = parse_memo_key(line).ok_or_else(|| malformed(at, "bad GET"))?;
                    self.memo_get(at, key)?;
                }
                op::BINGET => {
                    let key = self.byte()? as u32;
                    self.memo_get(at, key)?;
                }
                op::LONG_BINGET => {
                    let key = u32::from_le_bytes(self.array::<4>()?);
                    self.memo_get(at, key)?;
                }
                op::EXT1 | op::EXT2 | op::EXT4 => {
                    return Err(PickleError::Unsupported {
                        pos: at,
                        what: "extension registry codes (EXT1/2/4)".into(),
                    })
                }
                _ => return Err(PickleError::UnknownOpcode { op: code, pos: at }),
            }
        }
    }

    fn byte(&mut self) -> Result<u8, PickleError> {
        let b = *self
            .data
            .get(self.pos)
            .ok_or(PickleError::Truncated { pos: self.pos })?;
        self.pos += 1;
        Ok(b)
    }

    /// The next `n` bytes; a length beyond the input is an error before any
    /// allocation, so declared lengths cannot make us allocate.
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated {
                pos: self.data.len(),
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn take_u64(&mut self, n: u64) -> Result<&'a [u8], PickleError> {
        let n = usize::try_from(n).map_err(|_| PickleError::Truncated {
            pos: self.data.len(),
        })?;
        self.take(n)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// A text-protocol argument: the bytes up to `\n` (excluded), with a
    /// trailing `\r` dropped.
    fn line(&mut self) -> Result<&'a [u8], PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated {
                pos: self.data.len(),
            })?;
        self.pos += n + 1;
        let line = &rest[..n];
        Ok(line.strip_suffix(b"\r").unwrap_or(line))
    }

    fn text_line(&mut self, at: usize) -> Result<String, PickleError> {
        let line = self.line()?;
        std::str::from_utf8(line)
            .map(str::to_owned)
            .map_err(|_| malformed(at, "non-UTF-8 name"))
    }

    fn utf8(&mut self, n: u64) -> Result<Value, PickleError> {
        let b = self.take_u64(n)?;
        // Python pickles strings with `surrogatepass`; lone surrogates are
        // invalid UTF-8 here and become U+FFFD rather than an error.
        let s = match std::str::from_utf8(b) {
            Ok(s) => Arc::from(s),
            Err(_) => Arc::from(String::from_utf8_lossy(b).as_ref()),
        };
        Ok(Value::Str(s))
    }

    fn limit(&self, at: usize, what: &'static str, limit: usize) -> PickleError {
        PickleError::Limit {
            pos: at,
            what,
            limit,
        }
    }

    fn frame_start(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, at: usize, v: Value) -> Result<(), PickleError> {
        if self.stack.len() >= self.limits.max_stack {
            return Err(self.limit(at, "stack", self.limits.max_stack));
        }
        self.stack.push(v);
        Ok(())
    }

    fn new_obj(&mut self, at: usize, obj: Obj) -> Result<Value, PickleError> {
        if self.objs.len() >= self.limits.max_objects {
            return Err(self.limit(at, "object count", self.limits.max_objects));
        }
        self.objs.push(obj);
        Ok(Value::Ref(self.objs.len() - 1))
    }

    fn push_obj(&mut self, at: usize, obj: Obj) -> Result<(), PickleError> {
        let v = self.new_obj(at, obj)?;
        self.push(at, v)
    }

    /// Pops within the current mark frame, as Python does.
    fn pop(&mut self, at: usize) -> Result<Value, PickleError> {
        if self.stack.len() > self.frame_start() {
            Ok(self.stack.pop().unwrap_or(Value::None))
        } else {
            Err(underflow(at))
        }
    }

    fn top(&self, at: usize) -> Result<&Value, PickleError> {
        if self.stack.len() > self.frame_start() {
            self.stack.last().ok_or_else(|| underflow(at))
        } else {
            Err(underflow(at))
        }
    }

    fn pop_mark(&mut self, at: usize) -> Result<Vec<Value>, PickleError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| malformed(at, "no MARK on the stack"))?;
        Ok(self.stack.split_off(m))
    }

    fn target(&self, at: usize) -> Result<ObjId, PickleError> {
        match self.top(at)? {
            Value::Ref(id) => Ok(*id),
            _ => Err(malformed(at, "item added to a non-container")),
        }
    }

    fn extend_list(&mut self, at: usize, items: Vec<Value>) -> Result<(), PickleError> {
        let id = self.target(at)?;
        match &mut self.objs[id] {
            Obj::List(v) | Obj::Set(v) => v.extend(items),
            Obj::Call(inst) | Obj::Object(inst) => inst.list_items.extend(items),
            _ => return Err(malformed(at, "items appended to a non-list")),
        }
        Ok(())
    }

    fn extend_dict(&mut self, at: usize, pairs: Vec<(Value, Value)>) -> Result<(), PickleError> {
        let id = self.target(at)?;
        match &mut self.objs[id] {
            Obj::Dict(v) => v.extend(pairs),
            Obj::Call(inst) | Obj::Object(inst) => inst.dict_items.extend(pairs),
            _ => return Err(malformed(at, "items set on a non-dict")),
        }
        Ok(())
    }

    fn memo_put(&mut self, at: usize, key: u32) -> Result<(), PickleError> {
        let v = self.top(at)?.clone();
        if self.memo.len() >= self.limits.max_memo && !self.memo.contains_key(&key) {
            return Err(self.limit(at, "memo", self.limits.max_memo));
        }
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, at: usize, key: u32) -> Result<(), PickleError> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| malformed(at, format!("memo key {key} missing")))?;
        self.push(at, v)
    }
}

impl Instance {
    fn new(callable: Value, args: Value, kwargs: Option<Value>) -> Self {
        Instance {
            callable,
            args,
            kwargs,
            state: None,
            list_items: Vec::new(),
            dict_items: Vec::new(),
        }
    }
}

fn underflow(at: usize) -> PickleError {
    malformed(at, "stack underflow")
}

fn malformed(at: usize, what: impl Into<String>) -> PickleError {
    PickleError::Malformed {
        pos: at,
        what: what.into(),
    }
}

fn pairs(at: usize, items: Vec<Value>) -> Result<Vec<(Value, Value)>, PickleError> {
    if !items.len().is_multiple_of(2) {
        return Err(malformed(at, "odd number of dict items"));
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// Python 2 module names as Python 3's unpickler maps them (`fix_imports`;
/// a few of its mappings), so that protocol 0-2 pickles name the same
/// globals as newer ones (Python 3 writes `subprocess` as `commands` there).
fn global(module: String, name: String) -> Obj {
    let module = match module.as_str() {
        "__builtin__" | "exceptions" => "builtins".to_string(),
        "copy_reg" => "copyreg".to_string(),
        "commands" => "subprocess".to_string(),
        "cPickle" => "pickle".to_string(),
        _ => module,
    };
    Obj::Global { module, name }
}

/// Little-endian two's complement bytes (LONG1/LONG4) to an int.
fn int_from_le(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    if b.len() <= 8 {
        let neg = b[b.len() - 1] & 0x80 != 0;
        let mut buf = if neg { [0xffu8; 8] } else { [0u8; 8] };
        buf[..b.len()].copy_from_slice(b);
        return Value::Int(i64::from_le_bytes(buf));
    }
    // Wider encodings may still hold a small value (redundant sign bytes).
    let sign = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
    if b[8..].iter().all(|&x| x == sign) && (b[7] & 0x80 != 0) == (sign == 0xff) {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(&b[..8]);
        return Value::Int(i64::from_le_bytes(buf));
    }
    Value::BigInt(b.into())
}

/// A decimal integer (text opcodes) to an int, big ones as two's complement.
fn parse_decimal(s: &[u8]) -> Option<Value> {
    let s = std::str::from_utf8(s).ok()?.trim();
    if let Ok(v) = s.parse::<i64>() {
        return Some(Value::Int(v));
    }
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if digits.is_empty() || digits.len() > MAX_DECIMAL_DIGITS {
        return None;
    }
    // Magnitude in base 256, little-endian: mag = mag * 10 + digit.
    let mut mag: Vec<u8> = vec![0];
    for c in digits.bytes() {
        if !c.is_ascii_digit() {
            return None;
        }
        let mut carry = (c - b'0') as u32;
        for byte in mag.iter_mut() {
            let x = *byte as u32 * 10 + carry;
            *byte = x as u8;
            carry = x >> 8;
        }
        if carry > 0 {
            mag.push(carry as u8);
        }
    }
    // A zero top bit leaves room for the sign.
    mag.push(0);
    if neg {
        // Two's complement: invert and add one.
        let mut carry = 1u16;
        for byte in mag.iter_mut() {
            let x = (!*byte) as u16 + carry;
            *byte = x as u8;
            carry = x >> 8;
        }
    }
    Some(int_from_le(&mag))
}

fn parse_memo_key(line: &[u8]) -> Option<u32> {
    std::str::from_utf8(line).ok()?.trim().parse().ok()
}

/// Protocol 0 `STRING`: a quoted Python 2 string literal.
fn string_unescape(line: &[u8]) -> Option<Vec<u8>> {
    let q = *line.first()?;
    if !(q == b'\'' || q == b'"') || line.len() < 2 || *line.last()? != q {
        return None;
    }
    let body = &line[1..line.len() - 1];
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let e = *body.get(i)?;
        i += 1;
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'a' => out.push(0x07),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'v' => out.push(0x0b),
            b'x' => {
                let h = std::str::from_utf8(body.get(i..i + 2)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 2;
            }
            b'0'..=b'7' => {
                let mut v = (e - b'0') as u32;
                for _ in 0..2 {
                    match body.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + (d - b'0') as u32;
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    Some(out)
}

/// Protocol 0 `UNICODE`: "raw-unicode-escape", i.e. latin-1 bytes with
/// `\uXXXX` and `\UXXXXXXXX` escapes.
fn raw_unicode_unescape(line: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let c = line[i];
        if c == b'\\' && matches!(line.get(i + 1), Some(b'u') | Some(b'U')) {
            let n = if line[i + 1] == b'u' { 4 } else { 8 };
            let h = std::str::from_utf8(line.get(i + 2..i + 2 + n)?).ok()?;
            let cp = u32::from_str_radix(h, 16).ok()?;
            out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
            i += 2 + n;
        } else {
            out.push(c as char);
            i += 1;
        }
    }
    Some(out)
}

// ---- reading the result -------------------------------------------------

impl Pickle {
    /// The arena object a value refers to.
    pub fn obj(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Ref(id) => self.objs.get(*id),
            _ => None,
        }
    }

    /// `(module, name)` if `v` is a global reference.
    pub fn global(&self, v: &Value) -> Option<(&str, &str)> {
        match self.obj(v)? {
            Obj::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// The `Instance` of a `REDUCE` / `NEWOBJ` record, with its callable's
    /// dotted name when it is a global.
    pub fn instance(&self, v: &Value) -> Option<(&Instance, Option<String>)> {
        match self.obj(v)? {
            Obj::Call(inst) | Obj::Object(inst) => {
                let name = self.global(&inst.callable).map(|(m, n)| format!("{m}.{n}"));
                Some((inst, name))
            }
            _ => None,
        }
    }

    /// The entries of a dict: a plain dict, or an `OrderedDict` /
    /// `defaultdict` / `dict` record (whose items come from `SETITEMS`).
    pub fn dict_items(&self, v: &Value) -> Option<&[(Value, Value)]> {
        match self.obj(v)? {
            Obj::Dict(items) => Some(items),
            Obj::Call(inst) | Obj::Object(inst) => match self.global(&inst.callable)? {
                ("collections", "OrderedDict")
                | ("collections", "defaultdict")
                | ("builtins", "dict") => Some(&inst.dict_items),
                _ => None,
            },
            _ => None,
        }
    }

    /// The items of a list, tuple, set or frozenset (including `set([...])`
    /// records, which is how protocol 2 pickles sets).
    pub fn seq_items(&self, v: &Value) -> Option<&[Value]> {
        match self.obj(v)? {
            Obj::List(items) | Obj::Tuple(items) | Obj::Set(items) | Obj::FrozenSet(items) => {
                Some(items)
            }
            Obj::Call(inst) => match self.global(&inst.callable)? {
                ("builtins", "set") | ("builtins", "frozenset") | ("builtins", "list") => {
                    // Args are looked at directly (no recursion on hostile
                    // `set(set(set(...)))` chains).
                    match self.tuple_items(&inst.args)? {
                        [] => Some(&[]),
                        [inner] => match self.obj(inner)? {
                            Obj::List(items) | Obj::Tuple(items) => Some(items),
                            _ => None,
                        },
                        _ => None,
                    }
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// The elements of a tuple (only).
    pub fn tuple_items(&self, v: &Value) -> Option<&[Value]> {
        match self.obj(v)? {
            Obj::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// A short description of a value for error messages.
    pub fn describe(&self, v: &Value) -> String {
        match v {
            Value::None => "None".into(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::BigInt(_) => "big int".into(),
            Value::Float(f) => f.to_string(),
            Value::Str(s) => format!("{:?}", truncate(s, 60)),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Ref(_) => match self.obj(v) {
                Some(Obj::List(_)) => "list".into(),
                Some(Obj::Tuple(_)) => "tuple".into(),
                Some(Obj::Dict(_)) => "dict".into(),
                Some(Obj::Set(_)) | Some(Obj::FrozenSet(_)) => "set".into(),
                Some(Obj::Global { module, name }) => format!("global {module}.{name}"),
                Some(Obj::Call(inst)) => format!("call of {}", self.callable_name(inst)),
                Some(Obj::Object(inst)) => format!("object of {}", self.callable_name(inst)),
                Some(Obj::PersistentId(_)) => "persistent id".into(),
                None => "dangling reference".into(),
            },
        }
    }

    fn callable_name(&self, inst: &Instance) -> String {
        match self.global(&inst.callable) {
            Some((m, n)) => format!("{m}.{n}"),
            None => self.describe_shallow(&inst.callable),
        }
    }

    fn describe_shallow(&self, v: &Value) -> String {
        match v {
            Value::Ref(_) => "a computed callable".into(),
            other => self.describe(other),
        }
    }
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn str_v(s: &str) -> Value {
        Value::Str(s.into())
    }

    #[test]
    fn scalars_protocol2() {
        // pickle.dumps((1, -2, 300, 70000, 2**70, 1.5, 'hé', b'\x00', None, True), 2)
        let mut p = vec![0x80, 2, b'(', b'K', 1, b'J'];
        p.extend((-2i32).to_le_bytes());
        p.extend([b'M', 0x2c, 0x01, b'J']);
        p.extend(70000i32.to_le_bytes());
        p.extend([0x8a, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0x40]);
        p.push(b'G');
        p.extend(1.5f64.to_be_bytes());
        p.extend([b'X', 3, 0, 0, 0, b'h', 0xc3, 0xa9]);
        p.extend([b'C', 1, 0, b'N', 0x88, b't', b'.']);
        let pk = load(&p).unwrap();
        assert_eq!(pk.consumed, p.len());
        let items = pk.tuple_items(&pk.root).unwrap();
        assert_eq!(items[0], Value::Int(1));
        assert_eq!(items[1], Value::Int(-2));
        assert_eq!(items[2], Value::Int(300));
        assert_eq!(items[3], Value::Int(70000));
        assert_eq!(
            items[4],
            Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 0x40].into())
        );
        assert_eq!(items[5], Value::Float(1.5));
        assert_eq!(items[6], str_v("hé"));
        assert_eq!(items[7], Value::Bytes(vec![0].into()));
        assert_eq!(items[8], Value::None);
        assert_eq!(items[9], Value::Bool(true));
    }

    #[test]
    fn long1_small_and_negative() {
        assert_eq!(int_from_le(&[0xff]), Value::Int(-1));
        assert_eq!(int_from_le(&[0x00, 0x80, 0xff]), Value::Int(-32768));
        assert_eq!(int_from_le(&[5, 0, 0, 0, 0, 0, 0, 0, 0, 0]), Value::Int(5));
        assert_eq!(parse_decimal(b"-5"), Some(Value::Int(-5)));
        assert_eq!(
            parse_decimal(b"18446744073709551616"),
            Some(Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 0].into()))
        );
        assert_eq!(
            parse_decimal(b"-9223372036854775809"),
            Some(Value::BigInt(
                vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff].into()
            ))
        );
    }

    #[test]
    fn protocol0_text_opcodes() {
        // pickle.dumps({'a': [1, 2.5, u'x\u20ac'], 'b': 'q\'s'}, 0) (py2-style)
        let p =
            b"(dp0\nS'a'\np1\n(lp2\nI1\naF2.5\naVx\\u20ac\np3\nasS'b'\nS'q\\'s'\nsI01\nL12L\ns.";
        let pk = load(p).unwrap();
        let d = pk.dict_items(&pk.root).unwrap();
        assert_eq!(d[0].0, str_v("a"));
        let l = pk.seq_items(&d[0].1).unwrap();
        assert_eq!(l, &[Value::Int(1), Value::Float(2.5), str_v("x€")]);
        assert_eq!(d[1], (str_v("b"), str_v("q's")));
        assert_eq!(d[2], (Value::Bool(true), Value::Int(12)));
    }

    #[test]
    fn memo_shares_mutations() {
        // x = {}; pickle of [x, x] after x was filled through the memo:
        // ( ] q0 } q1 h1 h1 ... : EMPTY_LIST, BINPUT 0, MARK, EMPTY_DICT,
        // BINPUT 1, X'k' K1 SETITEM, BINGET 1, APPENDS
        let p = b"]q\x00(}q\x01X\x01\x00\x00\x00kK\x01sh\x01e.";
        let pk = load(p).unwrap();
        let l = pk.seq_items(&pk.root).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0], l[1]);
        assert_eq!(
            pk.dict_items(&l[1]).unwrap(),
            &[(str_v("k"), Value::Int(1))]
        );
    }

    #[test]
    fn reduce_is_inert() {
        // cposix\nsystem\n (S'touch /x'\ntR.
        let p = b"cposix\nsystem\n(S'touch /x'\ntR.";
        let pk = load(p).unwrap();
        let (inst, name) = pk.instance(&pk.root).unwrap();
        assert_eq!(name.as_deref(), Some("posix.system"));
        assert_eq!(pk.seq_items(&inst.args).unwrap(), &[str_v("touch /x")]);
    }

    #[test]
    fn ordered_dict_and_set_records() {
        // OrderedDict via REDUCE + SETITEMS, then BUILD; set via REDUCE.
        let p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00aK\x02s}bc__builtin__\nset\n]q\x02K\x07a\x85R\x86.";
        let pk = load(p).unwrap();
        let t = pk.tuple_items(&pk.root).unwrap();
        assert_eq!(
            pk.dict_items(&t[0]).unwrap(),
            &[(str_v("a"), Value::Int(2))]
        );
        assert_eq!(pk.seq_items(&t[1]).unwrap(), &[Value::Int(7)]);
    }

    #[test]
    fn errors_not_panics() {
        let bad: &[&[u8]] = &[
            b"",
            b"\x80",
            b"\x80\x09.",
            b"N",
            b".",
            b"0.",
            b"1.",
            b"a.",
            b"Ns.",
            b"Nb.",
            b"h\x05.",
            b"X\xff\xff\xff\xff",
            b"\x8d\xff\xff\xff\xff\xff\xff\xff\xffabc",
            b"\x8b\xff\xff\xff\x7f",
            b"\x8b\x00\x00\x00\x80",
            b"T\xff\xff\xff\xff",
            b"\x82\x01.",
            b"\x97.",
            b"\xff.",
            b"(K\x01d.",
            b"I123456789012345678901234567890x\n.",
            b"cmod\n",
            b"S'abc\n.",
            b"\x93.",
            b"NN\x93.",
        ];
        for (i, p) in bad.iter().enumerate() {
            assert!(load(p).is_err(), "case {i} should fail");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let lim = Limits {
            max_stack: 100,
            max_marks: 10,
            max_memo: 5,
            max_objects: 50,
        };
        let marks = vec![b'('; 20];
        assert!(matches!(
            load_with_limits(&marks, &lim),
            Err(PickleError::Limit { .. })
        ));
        let nones = vec![b'N'; 200];
        assert!(matches!(
            load_with_limits(&nones, &lim),
            Err(PickleError::Limit { .. })
        ));
        let mut memo = vec![b'N'];
        for k in 0..10u8 {
            memo.extend([b'q', k]);
        }
        assert!(matches!(
            load_with_limits(&memo, &lim),
            Err(PickleError::Limit { .. })
        ));
        let lists = vec![b']'; 60];
        assert!(matches!(
            load_with_limits(&lists, &lim),
            Err(PickleError::Limit { .. })
        ));
    }

    #[test]
    fn deep_nesting_is_cheap() {
        // A million nested 1-tuples: no recursion anywhere, drop included.
        let mut p = vec![b'N'];
        p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        p.push(b'.');
        let pk = load(&p).unwrap();
        assert_eq!(pk.objs.len(), 1_000_000);
    }
}
