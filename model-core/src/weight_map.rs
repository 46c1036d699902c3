//! A checkpoint's tensors by name, with bookkeeping of which ones the model
//! used, so that a checkpoint that does not fit the architecture is reported
//! with every problem at once (missing, unexpected and wrongly shaped keys)
//! instead of failing on the first one.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::fmt;

use candle_core::{DType, Device, Result, Tensor};

/// How many names of each kind [`WeightsMismatch`] prints before "... and N more".
const MAX_LISTED: usize = 12;

/// Weights that do not fit the architecture they were loaded into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightsMismatch {
    /// The detected (or requested) layout, e.g. `timm efficientnet (tf_efficientnet_b0)`.
    pub layout: String,
    /// Keys the architecture needs that the checkpoint lacks.
    pub missing: Vec<String>,
    /// Keys in the checkpoint that the architecture does not use.
    pub unexpected: Vec<String>,
    /// `(key, expected shape, shape found)`.
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl WeightsMismatch {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

/// Writes `items` comma-separated, at most [`MAX_LISTED`] of them.
fn write_list<T>(
    f: &mut fmt::Formatter<'_>,
    what: &str,
    items: &[T],
    show: impl Fn(&T) -> String,
) -> fmt::Result {
    if items.is_empty() {
        return Ok(());
    }
    write!(f, "\n  {what} ({}): ", items.len())?;
    let shown: Vec<String> = items.iter().take(MAX_LISTED).map(show).collect();
    write!(f, "{}", shown.join(", "))?;
    if items.len() > MAX_LISTED {
        write!(f, ", ... and {} more", items.len() - MAX_LISTED)?;
    }
    Ok(())
}

impl fmt::Display for WeightsMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the weights do not fit the architecture (detected layout: {}): \
             {} missing, {} unexpected, {} with the wrong shape",
            self.layout,
            self.missing.len(),
            self.unexpected.len(),
            self.mismatched.len()
        )?;
        write_list(f, "missing", &self.missing, |k| format!("`{k}`"))?;
        write_list(f, "unexpected", &self.unexpected, |k| format!("`{k}`"))?;
        write_list(f, "wrong shape", &self.mismatched, |(k, want, got)| {
            format!("`{k}` (expected {want:?}, found {got:?})")
        })
    }
}

impl std::error::Error for WeightsMismatch {}

/// Orders keys the way people read them: `blocks.2.10` after `blocks.2.9`.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> impl Iterator<Item = (Option<u64>, &str)> {
        s.split('.').map(|p| (p.parse::<u64>().ok(), p))
    }
    parts(a).cmp(parts(b))
}

/// Sorts keys in natural order (see [`natural_cmp`]).
pub fn sort_natural(keys: &mut [String]) {
    keys.sort_by(|a, b| natural_cmp(a, b));
}

/// A checkpoint's tensor shapes by name: all that architecture detection
/// needs, and cheap to get from a safetensors header without the data.
pub type Shapes = HashMap<String, Vec<usize>>;

/// Dimension `i` of tensor `key`, if it is there and has that many dimensions.
pub fn dim_of(shapes: &Shapes, key: &str, i: usize) -> Option<usize> {
    shapes.get(key).and_then(|s| s.get(i).copied())
}

/// The distinct numbers `N` of keys `prefix.N.*`, ascending: the children of
/// an `nn.Sequential` / `nn.ModuleList`.
pub fn child_indices(shapes: &Shapes, prefix: &str) -> Vec<usize> {
    let lead = format!("{prefix}.");
    let found: BTreeSet<usize> = shapes
        .keys()
        .filter_map(|k| k.strip_prefix(&lead))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    found.into_iter().collect()
}

/// Problems found while loading, kept until [`WeightMap::finish`].
#[derive(Default)]
struct Record {
    used: BTreeSet<String>,
    missing: Vec<String>,
    mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

/// A checkpoint's tensors, keyed by their original names.
pub struct WeightMap {
    tensors: HashMap<String, Tensor>,
    /// Keys ending in one of these are never reported as unexpected.
    ignored_suffixes: Vec<String>,
    // Interior mutability so that layer constructors can take `&WeightMap`
    // and still record what they used.
    record: RefCell<Record>,
}

impl WeightMap {
    /// Wraps the tensors. `num_batches_tracked` (a PyTorch training counter)
    /// is ignored from the start.
    pub fn new(tensors: HashMap<String, Tensor>) -> Self {
        Self {
            tensors,
            ignored_suffixes: vec!["num_batches_tracked".to_string()],
            record: RefCell::new(Record::default()),
        }
    }

    /// Declares keys ending in `suffix` as fine to leave unused.
    pub fn ignore_suffix(&mut self, suffix: &str) {
        self.ignored_suffixes.push(suffix.to_string());
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The shape of a stored tensor, without marking it as used.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.dims())
    }

    /// Every key with its shape (what architecture detection looks at).
    pub fn shapes(&self) -> Shapes {
        self.tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect()
    }

    /// Keys starting with `prefix`, in natural order.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        sort_natural(&mut keys);
        keys
    }

    /// The tensor `name` as f32 on the CPU, which must have `expected_shape`.
    ///
    /// A missing key or a wrong shape is recorded, not returned: a zero tensor
    /// of the expected shape stands in so that loading goes on and
    /// [`WeightMap::finish`] can report every problem together.
    pub fn get(&self, name: &str, expected_shape: &[usize]) -> Result<Tensor> {
        let mut record = self.record.borrow_mut();
        record.used.insert(name.to_string());
        match self.tensors.get(name) {
            Some(t) if t.dims() == expected_shape => to_f32_cpu(t),
            Some(t) => {
                let found = t.dims().to_vec();
                record
                    .mismatched
                    .push((name.to_string(), expected_shape.to_vec(), found));
                Tensor::zeros(expected_shape, DType::F32, &Device::Cpu)
            }
            None => {
                record.missing.push(name.to_string());
                Tensor::zeros(expected_shape, DType::F32, &Device::Cpu)
            }
        }
    }

    /// The tensor `name` as f32 on the CPU, whatever its shape. A missing key
    /// is an immediate error naming it.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("missing weight `{name}`")))?;
        self.record.borrow_mut().used.insert(name.to_string());
        to_f32_cpu(t)
    }

    /// Checks that every key was used (or is ignorable) and that nothing was
    /// missing or misshapen; `layout` names what the weights were taken for.
    pub fn finish(self, layout: &str) -> std::result::Result<(), WeightsMismatch> {
        let record = self.record.into_inner();
        let mut unexpected: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !record.used.contains(*k))
            .filter(|k| {
                !self
                    .ignored_suffixes
                    .iter()
                    .any(|s| k.ends_with(s.as_str()))
            })
            .cloned()
            .collect();
        sort_natural(&mut unexpected);
        let mut missing = record.missing;
        sort_natural(&mut missing);
        missing.dedup();
        let mut mismatched = record.mismatched;
        mismatched.sort_by(|a, b| natural_cmp(&a.0, &b.0));
        mismatched.dedup_by(|a, b| a.0 == b.0);
        let mismatch = WeightsMismatch {
            layout: layout.to_string(),
            missing,
            unexpected,
            mismatched,
        };
        if mismatch.is_empty() {
            Ok(())
        } else {
            Err(mismatch)
        }
    }
}

fn to_f32_cpu(t: &Tensor) -> Result<Tensor> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &[usize])]) -> WeightMap {
        let tensors = entries
            .iter()
            .map(|(k, s)| {
                (
                    k.to_string(),
                    Tensor::ones(*s, DType::F16, &Device::Cpu).unwrap(),
                )
            })
            .collect();
        WeightMap::new(tensors)
    }

    #[test]
    fn reports_every_problem_together() {
        let wm = map(&[
            ("a.weight", &[2, 3]),
            ("b.weight", &[4]),
            ("c.extra", &[1]),
            ("bn.num_batches_tracked", &[]),
        ]);
        assert_eq!(wm.get("a.weight", &[2, 3]).unwrap().dtype(), DType::F32);
        let placeholder = wm.get("b.weight", &[5]).unwrap();
        assert_eq!(placeholder.dims(), &[5]);
        assert_eq!(wm.get("d.weight", &[7]).unwrap().dims(), &[7]);
        let err = wm.finish("test layout").unwrap_err();
        assert_eq!(err.missing, vec!["d.weight"]);
        assert_eq!(err.unexpected, vec!["c.extra"]);
        assert_eq!(
            err.mismatched,
            vec![("b.weight".to_string(), vec![5], vec![4])]
        );
        let text = err.to_string();
        for needle in [
            "test layout",
            "d.weight",
            "c.extra",
            "b.weight",
            "[5]",
            "[4]",
        ] {
            assert!(text.contains(needle), "{needle} not in {text}");
        }
    }

    #[test]
    fn ignored_suffixes_and_get_any() {
        let mut wm = map(&[("x.weight", &[3]), ("x.aux", &[1])]);
        wm.ignore_suffix(".aux");
        assert!(wm.get_any("nope").unwrap_err().to_string().contains("nope"));
        assert_eq!(wm.get_any("x.weight").unwrap().dims(), &[3]);
        assert!(wm.finish("l").is_ok());
    }

    #[test]
    fn long_lists_are_truncated() {
        let m = WeightsMismatch {
            layout: "l".into(),
            missing: (0..30).map(|i| format!("k{i}")).collect(),
            unexpected: vec![],
            mismatched: vec![],
        };
        let text = m.to_string();
        assert!(text.contains("and 18 more"), "{text}");
        assert!(!text.contains("k29"));
    }

    #[test]
    fn natural_order() {
        let mut keys = vec!["b.10.w".to_string(), "b.9.w".into(), "a".into()];
        sort_natural(&mut keys);
        assert_eq!(keys, vec!["a", "b.9.w", "b.10.w"]);
    }
}
