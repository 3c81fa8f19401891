package dev.onceflow.bench;

import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.nio.file.Files;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Produced;

/**
 * The benchmark's transform as a Kafka Streams application: parse the JSON value, set
 * {@code "enriched": true}, re-serialise, keep the key (so the output goes to the partition the
 * key hashes to) and the input's timestamp (Kafka Streams' default).
 *
 * <p>Usage: {@code Enrich <exactly_once_v2|at_least_once> <bootstrap> <input> <output>
 * <application.id> <commit.interval.ms>}. Prints {@code ready} on stdout once the instance
 * reaches RUNNING (partitions assigned, tasks created), then runs until killed. Everything
 * else is left at Kafka Streams' defaults — what a user gets out of the box — apart from the
 * state directory (a fresh temporary one, so runs never share a lock).
 */
public final class Enrich {
  private static final ObjectMapper JSON = new ObjectMapper();

  private Enrich() {}

  static byte[] transform(byte[] value) {
    try {
      ObjectNode item = (ObjectNode) JSON.readTree(value);
      item.put("enriched", true);
      return JSON.writeValueAsBytes(item);
    } catch (java.io.IOException e) {
      throw new IllegalArgumentException("not a JSON object: " + e.getMessage(), e);
    }
  }

  public static void main(String[] args) throws Exception {
    if (args.length != 6) {
      System.err.println(
          "usage: Enrich <exactly_once_v2|at_least_once> <bootstrap> <input> <output>"
              + " <application.id> <commit.interval.ms>");
      System.exit(2);
    }
    String guarantee = args[0];
    Properties props = new Properties();
    props.put(StreamsConfig.APPLICATION_ID_CONFIG, args[4]);
    props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, args[1]);
    props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, guarantee);
    props.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, args[5]);
    props.put(
        StreamsConfig.STATE_DIR_CONFIG,
        Files.createTempDirectory("onceflow-bench-kstreams").toString());
    props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");

    StreamsBuilder builder = new StreamsBuilder();
    builder.stream(args[2], Consumed.with(Serdes.ByteArray(), Serdes.ByteArray()))
        .mapValues(Enrich::transform)
        .to(args[3], Produced.with(Serdes.ByteArray(), Serdes.ByteArray()));

    KafkaStreams streams = new KafkaStreams(builder.build(), props);
    CountDownLatch failed = new CountDownLatch(1);
    streams.setStateListener(
        (now, before) -> {
          if (now == KafkaStreams.State.RUNNING && before == KafkaStreams.State.REBALANCING) {
            System.out.println("ready");
            System.out.flush();
          }
          if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.PENDING_ERROR) {
            failed.countDown();
          }
        });
    streams.setUncaughtExceptionHandler(
        e -> {
          System.err.println("stream thread failed: " + e);
          return org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler
              .StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
    streams.start();
    failed.await();
    streams.close();
    System.exit(1);
  }
}
