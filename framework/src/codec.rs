//! Decoding input values into the processor's `Input` type, and encoding output values as JSON.
//!
//! A pipeline has one codec for its input. [`Json`] (the default) decodes with serde; [`Raw`]
//! hands the bytes over untouched, for processors that parse themselves. A value that cannot be
//! decoded never reaches the processor and never panics: it is dead-lettered (or, if so
//! configured, stops the pipeline) with the codec's error as the reason.

use std::cell::RefCell;
use std::marker::PhantomData;

use serde::Serialize;
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

/// A per-thread scratch buffer larger than this is dropped after use, so one huge value does
/// not keep its memory alive on every thread that ever encoded one.
const SCRATCH_KEEP: usize = 64 * 1024;

/// `value` as JSON, in a vector of exactly its length. What [`OutputRecord::json`] uses.
///
/// Why not `serde_json::to_vec`: it grows its vector from empty, doubling — eight reallocations
/// for a 1 KiB value, each of which may move the bytes written so far. In the transaction loop
/// every output of a batch stays alive until the batch is produced, so the allocator can seldom
/// grow one in place: a `perf` profile of the benchmark's worker at 1 KiB put `realloc` alone at
/// ~0.19 CPU µs per record, against ~0.03 for the at-least-once copy loop, whose one output at
/// a time is freed before the next. Here the value is written into a per-thread scratch buffer
/// that keeps its capacity between calls, then copied once into an allocation of the right
/// size, while the bytes are still in cache (the worker thread: ~2.57 → ~2.33 µs per record).
///
/// [`OutputRecord::json`]: crate::OutputRecord::json
pub(crate) fn encode_json<V: Serialize + ?Sized>(value: &V) -> serde_json::Result<Vec<u8>> {
    thread_local! {
        static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|scratch| {
        // Taken already only if a `Serialize` impl encodes another value itself: that inner
        // call pays the plain way rather than panic.
        let Ok(mut buf) = scratch.try_borrow_mut() else {
            return serde_json::to_vec(value);
        };
        buf.clear();
        let encoded = serde_json::to_writer(&mut *buf, value).map(|()| buf.to_vec());
        if buf.capacity() > SCRATCH_KEEP {
            *buf = Vec::new();
        }
        encoded
    })
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
    fn encode_json_writes_what_serde_json_writes_in_an_exact_allocation() {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            id: u64,
            pad: &'a str,
        }
        // Small, then large (past the scratch's keep limit), then small again: each result
        // stands alone, whatever the scratch held before.
        for len in [10, 1_000, 100_000, 3] {
            let pad = "x".repeat(len);
            let value = Out { id: 7, pad: &pad };
            let bytes = encode_json(&value).unwrap();
            assert_eq!(bytes, serde_json::to_vec(&value).unwrap());
            assert_eq!(bytes.capacity(), bytes.len());
        }
        // A value serde_json refuses is an error, not a panic.
        let mut bad = std::collections::HashMap::new();
        bad.insert(vec![1u8], 1);
        assert!(encode_json(&bad).is_err());
    }

    /// A `Serialize` impl that encodes another value while it is itself being encoded.
    struct Nested;

    impl serde::Serialize for Nested {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let inner = encode_json(&[1, 2]).map_err(serde::ser::Error::custom)?;
            s.serialize_bytes(&inner)
        }
    }

    #[test]
    fn encode_json_inside_encode_json_does_not_panic() {
        assert_eq!(encode_json(&Nested).unwrap(), b"[91,49,44,50,93]");
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
