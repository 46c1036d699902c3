//! Why a model could not be loaded: the error every model family returns.

use crate::weight_map::{sort_natural, Shapes, WeightsMismatch};

/// How many key names an "unknown layout" error shows.
const KEYS_SHOWN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The keys match no supported checkpoint layout.
    #[error("unrecognised checkpoint layout: {reason}{keys}")]
    UnknownLayout { reason: String, keys: String },
    #[error(transparent)]
    WeightsMismatch(#[from] WeightsMismatch),
    #[error("unknown architecture `{name}`; known: {known}")]
    UnknownArch { name: String, known: String },
    #[error("architecture `{requested}` does not match the weights, which look like {detected}")]
    ArchMismatch { requested: String, detected: String },
    #[error("model error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn unknown_layout(reason: &str, shapes: &Shapes) -> Self {
        let mut keys: Vec<String> = shapes.keys().cloned().collect();
        sort_natural(&mut keys);
        let mut shown = keys
            .iter()
            .take(KEYS_SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if keys.len() > KEYS_SHOWN {
            shown.push_str(&format!(", ... ({} keys in all)", keys.len()));
        }
        Self::UnknownLayout {
            reason: reason.to_string(),
            keys: format!(
                "; keys seen: {}",
                if shown.is_empty() {
                    "none".into()
                } else {
                    shown
                }
            ),
        }
    }
}
