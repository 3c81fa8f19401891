//! Decoding input values into the processor's `Input` type, and encoding output values as JSON.
//!
//! A pipeline has one codec for its input. [`Json`] (the default) decodes with serde; [`Raw`]
//! hands the bytes over untouched, for processors that parse themselves. A value that cannot be
//! decoded never reaches the processor and never panics: it is dead-lettered (or, if so
//! configured, stops the pipeline) with the codec's error as the reason.

use std::cell::RefCell;
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
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

/// The size of the blocks [`encode_json`] writes output values into.
const OUTPUT_BLOCK: usize = 32 * 1024;

/// A value is started in the current block only if the block has this much room left; with
/// less, a new block is started. (Most values then fit where they start; one that does not is
/// moved out as it grows, see [`encode_json`].)
const OUTPUT_ROOM: usize = OUTPUT_BLOCK / 8;

/// `value` as JSON, written straight into a per-thread block shared with the thread's
/// neighbouring values. What [`OutputRecord::json`] uses.
///
/// Why not `serde_json::to_vec`: it grows its vector from empty, doubling — eight reallocations
/// for a 1 KiB value, each of which may move the bytes written so far. In the transaction loop
/// every output of a batch stays alive until the batch is produced, so the allocator can seldom
/// grow one in place: a `perf` profile of the benchmark's worker at 1 KiB put `realloc` alone at
/// ~0.19 CPU µs per record, against ~0.03 for the at-least-once copy loop, whose one output at
/// a time is freed before the next.
///
/// Why not one exact allocation per value either (what this did until the blocks): a 1 KiB
/// record's output is ~1,040 bytes, just over the 1,032 bytes glibc's per-thread cache holds,
/// and a batch frees hundreds of them at once, so every allocation and free took the arena's
/// slow paths (`perf`: glibc's allocator 0.45 CPU µs per record on the worker against 0.19 for
/// the at-least-once copy loop; docs/benchmarks-journal.md). In a block, values cost one
/// allocation per few dozen and a reference count each, and are written in place, without the
/// copy out of a scratch buffer.
///
/// A block is freed when the last value written into it is dropped. A value that outgrows its
/// block's room is moved by `BytesMut` into a new buffer of at least a block; if what is left
/// of that buffer is larger than a block (after a value of hundreds of kilobytes), it is let go
/// rather than kept for later values, so one huge value does not keep its memory alive on every
/// thread that ever encoded one.
///
/// [`OutputRecord::json`]: crate::OutputRecord::json
pub(crate) fn encode_json<V: Serialize + ?Sized>(value: &V) -> serde_json::Result<Bytes> {
    thread_local! {
        static BLOCK: RefCell<BytesMut> = RefCell::new(BytesMut::new());
    }
    BLOCK.with(|block| {
        // Taken already only if a `Serialize` impl encodes another value itself: that inner
        // call pays the plain way rather than panic.
        let Ok(mut block) = block.try_borrow_mut() else {
            return serde_json::to_vec(value).map(Bytes::from);
        };
        // After a `split` the view is empty, and its capacity is the block's unused rest.
        if block.capacity() < OUTPUT_ROOM {
            *block = BytesMut::with_capacity(OUTPUT_BLOCK);
        }
        if let Err(e) = serde_json::to_writer(BlockWriter(&mut block), value) {
            // The bytes written before the failure are overwritten by the next value.
            block.clear();
            return Err(e);
        }
        let encoded = block.split().freeze();
        if block.capacity() > OUTPUT_BLOCK {
            *block = BytesMut::new();
        }
        Ok(encoded)
    })
}

/// Appends to a block as `Vec<u8>`'s `Write` does: every slice whole, in one call.
///
/// Why not `BufMut::writer`: its `write` takes what fits and `write_all` loops around it, which
/// `perf` put at ~0.1 CPU µs per 1 KiB output in `put_slice` and `write_all` on top of the
/// serializer (serde_json writes a string in many small slices).
struct BlockWriter<'a>(&'a mut BytesMut);

impl std::io::Write for BlockWriter<'_> {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.extend_from_slice(buf);
        Ok(())
    }

    #[inline]
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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

    #[derive(serde::Serialize)]
    struct Out<'a> {
        id: u64,
        pad: &'a str,
    }

    fn out(pad: &str) -> Out<'_> {
        Out { id: 7, pad }
    }

    #[test]
    fn encode_json_writes_what_serde_json_writes() {
        // Small, then large (past a block), then small again: each result stands alone,
        // whatever the block held before.
        for len in [10, 1_000, 5_000, 100_000, 3] {
            let pad = "x".repeat(len);
            let bytes = encode_json(&out(&pad)).unwrap();
            assert_eq!(bytes, serde_json::to_vec(&out(&pad)).unwrap());
        }
    }

    #[test]
    fn neighbouring_outputs_share_a_block_and_a_huge_one_does_not_keep_its_buffer_for_others() {
        let pad = "y".repeat(1_000);
        let a = encode_json(&out(&pad)).unwrap();
        let b = encode_json(&out(&pad)).unwrap();
        // One block: the second value starts where the first ends.
        assert_eq!(b.as_ptr(), a.as_ptr().wrapping_add(a.len()));

        // A failed value leaves nothing behind: the next one starts where it started.
        let mut bad = std::collections::HashMap::new();
        bad.insert(vec![1u8], 1);
        assert!(encode_json(&bad).is_err());
        let c = encode_json(&out(&pad)).unwrap();
        assert_eq!(c.as_ptr(), b.as_ptr().wrapping_add(b.len()));

        // A value that outgrows its block moves out; after one far larger than a block, the
        // next value is written into a new block, not into the rest of the huge one's buffer.
        let huge_pad = "z".repeat(10 * OUTPUT_BLOCK);
        let huge = encode_json(&out(&huge_pad)).unwrap();
        assert_eq!(huge, serde_json::to_vec(&out(&huge_pad)).unwrap());
        let d = encode_json(&out(&pad)).unwrap();
        assert_ne!(d.as_ptr(), huge.as_ptr().wrapping_add(huge.len()));
        let e = encode_json(&out(&pad)).unwrap();
        assert_eq!(e.as_ptr(), d.as_ptr().wrapping_add(d.len()));
        for v in [&a, &b, &c, &d, &e] {
            assert_eq!(v[..], serde_json::to_vec(&out(&pad)).unwrap()[..]);
        }
    }

    #[test]
    fn a_value_serde_json_refuses_is_an_error_not_a_panic() {
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
        assert_eq!(encode_json(&Nested).unwrap(), &b"[91,49,44,50,93]"[..]);
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
