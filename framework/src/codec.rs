//! Decoding input values into the processor's `Input` type.
//!
//! A pipeline has one codec for its input. [`Json`] (the default) decodes with serde; [`Raw`]
//! hands the bytes over untouched, for processors that parse themselves. A value that cannot be
//! decoded never reaches the processor and never panics: it is dead-lettered (or, if so
//! configured, stops the pipeline) with the codec's error as the reason.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;

/// Why a value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode the input value: {0}")]
pub struct DecodeError(pub String);

/// Turns an input value's bytes into `T`.
pub trait Codec<T>: Send + Sync + 'static {
    /// Decodes `payload` (`None` is a null value, a tombstone).
    fn decode(&self, payload: Option<&[u8]>) -> Result<T, DecodeError>;
}

/// JSON via serde. A null value (tombstone) is a decode error unless `T` is an `Option`
/// (`null` decodes into `None`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<T: DeserializeOwned + 'static> Codec<T> for Json {
    fn decode(&self, payload: Option<&[u8]>) -> Result<T, DecodeError> {
        let bytes = payload.unwrap_or(b"null");
        serde_json::from_slice(bytes).map_err(|e| DecodeError(format!("invalid JSON: {e}")))
    }
}

/// The raw bytes: `Input = Option<Vec<u8>>` (`None` for a tombstone). Never fails.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec<Option<Vec<u8>>> for Raw {
    fn decode(&self, payload: Option<&[u8]>) -> Result<Option<Vec<u8>>, DecodeError> {
        Ok(payload.map(<[u8]>::to_vec))
    }
}

/// UTF-8 text: `Input = String`. Invalid UTF-8 or a tombstone is a decode error.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8;

impl Codec<String> for Utf8 {
    fn decode(&self, payload: Option<&[u8]>) -> Result<String, DecodeError> {
        let bytes = payload.ok_or_else(|| DecodeError("null value (tombstone)".into()))?;
        String::from_utf8(bytes.to_vec()).map_err(|e| DecodeError(format!("invalid UTF-8: {e}")))
    }
}

/// A codec from a function, for formats onceflow does not ship.
pub struct FnCodec<T, F> {
    f: F,
    _t: PhantomData<fn() -> T>,
}

impl<T, F> FnCodec<T, F>
where
    F: Fn(Option<&[u8]>) -> Result<T, DecodeError> + Send + Sync + 'static,
{
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        Self { f, _t: PhantomData }
    }
}

impl<T, F> std::fmt::Debug for FnCodec<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnCodec")
    }
}

impl<T: 'static, F> Codec<T> for FnCodec<T, F>
where
    F: Fn(Option<&[u8]>) -> Result<T, DecodeError> + Send + Sync + 'static,
{
    fn decode(&self, payload: Option<&[u8]>) -> Result<T, DecodeError> {
        (self.f)(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Order {
        id: u64,
    }

    #[test]
    fn json_decodes_and_reports_garbage() {
        let ok: Order = Json.decode(Some(br#"{"id":7}"#)).unwrap();
        assert_eq!(ok, Order { id: 7 });
        let err = Codec::<Order>::decode(&Json, Some(b"{not json")).unwrap_err();
        assert!(err.to_string().contains("invalid JSON"));
        assert!(Codec::<Order>::decode(&Json, None).is_err());
        let tomb: Option<Order> = Json.decode(None).unwrap();
        assert_eq!(tomb, None);
    }

    #[test]
    fn raw_and_utf8() {
        assert_eq!(Raw.decode(Some(b"\xff")).unwrap(), Some(vec![0xff]));
        assert_eq!(Raw.decode(None).unwrap(), None);
        assert!(Utf8.decode(Some(b"\xff")).is_err());
        assert_eq!(Utf8.decode(Some(b"hi")).unwrap(), "hi");
    }

    #[test]
    fn fn_codec() {
        let c = FnCodec::new(|p: Option<&[u8]>| Ok(p.map_or(0, <[u8]>::len)));
        assert_eq!(c.decode(Some(b"abc")).unwrap(), 3);
    }
}
