//! Key → partition routing that agrees with the Java client.
//!
//! Kafka keeps records in order only within one partition, so "all of one user's events in
//! order" means "all of one user's events on one partition". That holds across producers only
//! when every producer maps a key to the same partition. The Java client (and so Kafka
//! Streams, Spring Kafka, ksqlDB, Connect) uses `murmur2(key) & 0x7fffffff % partitions`.
//! librdkafka's *default* partitioner (`consistent_random`, CRC32) does not, so a Rust service
//! and a Java service writing the same key would split that key's events over two partitions
//! and lose their relative order. onceflow therefore routes keys itself with [`partition_for_key`]
//! and configures librdkafka's `murmur2_random` partitioner as a second line of defence.
//!
//! Records without a key have no order to keep; librdkafka spreads them.

/// The seed the Java client passes to murmur2 (`Utils.murmur2`).
const JAVA_SEED: u32 = murmur2::KAFKA_SEED;

/// The 32-bit murmur2 hash of `key`, exactly as Java's `org.apache.kafka.common.utils.Utils.murmur2`
/// returns it (a signed `int`).
///
/// ```
/// assert_eq!(onceflow::partitioner::java_murmur2(b"foobar"), -790_332_482);
/// ```
#[must_use]
pub fn java_murmur2(key: &[u8]) -> i32 {
    // Java computes in `int` and returns the bits unchanged; reinterpreting the u32 gives the
    // same signed value.
    murmur2::murmur2(key, JAVA_SEED) as i32
}

/// The partition the Java client's default partitioner picks for a keyed record.
///
/// Returns `None` when `partitions` is not positive: there is no partition to route to, and
/// a division by zero must not be the way the caller finds out.
///
/// ```
/// use onceflow::partitioner::partition_for_key;
/// assert_eq!(partition_for_key(b"hejsan", 3), Some(1));
/// assert_eq!(partition_for_key(b"abc", 6), Some(3));
/// assert_eq!(partition_for_key(b"abc", 0), None);
/// ```
#[must_use]
pub fn partition_for_key(key: &[u8], partitions: i32) -> Option<i32> {
    if partitions <= 0 {
        return None;
    }
    // `toPositive` in the Java client: clear the sign bit, not `abs` (abs(i32::MIN) overflows).
    Some((java_murmur2(key) & 0x7fff_ffff) % partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Apache Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_kafka_published_vectors() {
        let cases: &[(&str, i32)] = &[
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(java_murmur2(key.as_bytes()), *expected, "murmur2({key:?})");
        }
    }

    /// Key → partition vectors from the Java client's `DefaultPartitioner`/`BuiltInPartitioner`
    /// tests.
    #[test]
    fn partition_for_key_matches_java_client() {
        let cases: &[(&str, i32, i32)] = &[
            ("hejsan", 3, 1),
            ("hejsan", 7, 6),
            ("hejsan", 17, 5),
            ("abc", 3, 0),
            ("abc", 6, 3),
            ("abc", 7, 4),
        ];
        for (key, partitions, expected) in cases {
            assert_eq!(
                partition_for_key(key.as_bytes(), *partitions),
                Some(*expected),
                "partition_for_key({key:?}, {partitions})"
            );
        }
    }

    #[test]
    fn partition_for_key_is_always_in_range() {
        for i in 0..10_000u32 {
            let key = i.to_be_bytes();
            for n in [1, 2, 3, 6, 7, 100] {
                let p = partition_for_key(&key, n).unwrap();
                assert!((0..n).contains(&p), "{p} out of 0..{n}");
            }
        }
    }

    #[test]
    fn no_partitions_is_none_not_a_panic() {
        assert_eq!(partition_for_key(b"k", 0), None);
        assert_eq!(partition_for_key(b"k", -3), None);
    }
}
