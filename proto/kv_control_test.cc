#include "proto/kv_control.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "proto/testdata/kv_control_v1.capnp.h"

namespace pd::proto {
namespace {

std::span<const uint8_t> Payload(const std::string& frame) {
  return {reinterpret_cast<const uint8_t*>(frame.data()) + kFrameHeaderBytes,
          frame.size() - kFrameHeaderBytes};
}

ControlMessage RoundTrip(const ControlMessage& m) {
  auto frame = EncodeFrame(m);
  EXPECT_TRUE(frame.ok()) << frame.status();
  auto len = DecodeFrameHeader(
      {reinterpret_cast<const uint8_t*>(frame->data()), kFrameHeaderBytes});
  EXPECT_TRUE(len.ok()) << len.status();
  EXPECT_EQ(*len, frame->size() - kFrameHeaderBytes);
  auto back = DecodePayload(Payload(*frame));
  EXPECT_TRUE(back.ok()) << back.status();
  return *back;
}

Manifest SampleManifest() {
  Manifest m;
  m.request_id = "req-0001";
  m.model_fingerprint = "0123456789abcdef";
  m.num_layers = 61;
  m.num_tokens = 131072;
  m.page_tokens = 64;
  m.objects.push_back({ObjectKind::kMlaLatent, Dtype::kE4M3, 512, Dtype::kFp32, 128, Dtype::kBf16,
                       64, 656, 1, 64 * 656});
  m.objects.push_back({ObjectKind::kIndexKey, Dtype::kE4M3, 128, Dtype::kFp32, 128, Dtype::kNone, 0,
                       132, 1, 64 * 132});
  m.objects.push_back({ObjectKind::kSummary, Dtype::kFp32, 128, Dtype::kNone, 0, Dtype::kNone, 0,
                       512, 1024, 0});
  m.backend = "ucx";
  m.sender_info = std::string("\0\1\2binary\xff", 10);
  m.max_chunk_bytes = 4 << 20;
  m.staged = true;
  m.checksum = true;
  m.source_pages = {3, 4, 9};
  return m;
}

TEST(KvControlTest, EveryMessageRoundTrips) {
  Manifest m = SampleManifest();
  EXPECT_EQ(std::get<Manifest>(RoundTrip(m)), m);

  Accept a;
  a.request_id = "req-0001";
  a.page_table = {5, 6, 7, -1, 2147483647};
  a.receiver_info = std::string("rkey\0blob", 9);
  a.mla_offsets = {0, 1ull << 40};
  a.index_offsets = {7, 8};
  a.summary_offsets = {9, 10};
  a.staging_slots = 16;
  a.slot_bytes = 1 << 20;
  a.credit_bytes = 64 << 20;
  a.credit_chunks = 32;
  EXPECT_EQ(std::get<Accept>(RoundTrip(a)), a);

  ChunkBatch b;
  b.chunks.push_back({1, 60, ObjectKind::kSummary, 0, 131072, 0, 128, 65536, 0xdeadbeefcafef00dull, 2, 3});
  b.chunks.push_back({2, 0, ObjectKind::kMlaLatent, 64, 128, 1, 1, 41984, 1, 0, 0});
  EXPECT_EQ(std::get<ChunkBatch>(RoundTrip(b)), b);

  AckBatch acks{{{1, true}, {2, false}}, 12345, 6};
  EXPECT_EQ(std::get<AckBatch>(RoundTrip(acks)), acks);
  EXPECT_EQ(std::get<LayerReady>(RoundTrip(LayerReady{42})), LayerReady{42});
  EXPECT_EQ(std::get<Done>(RoundTrip(Done{7, 1ull << 33})), (Done{7, 1ull << 33}));
  Abort ab{uint32_t(absl::StatusCode::kDataLoss), "checksum mismatch on chunk 3"};
  EXPECT_EQ(std::get<Abort>(RoundTrip(ab)), ab);
  EXPECT_EQ(std::get<Heartbeat>(RoundTrip(Heartbeat{99})), Heartbeat{99});
  EXPECT_EQ(std::get<Quiesced>(RoundTrip(Quiesced{1234})), Quiesced{1234});
  EXPECT_STREQ(MessageName(Quiesced{}), "quiesced");

  m.sender_node = "prefill-7";
  m.checksum_every = 64;
  Manifest back = std::get<Manifest>(RoundTrip(m));
  EXPECT_EQ(back.sender_node, "prefill-7");
  EXPECT_EQ(back.checksum_every, 64u);
}

// Old peers (the schema as first released, testdata/kv_control_v1.capnp) and
// new ones understand each other: a v1 manifest decodes with the new fields at
// their "absent" values, and a new manifest reads correctly with the v1 schema.
TEST(KvControlTest, FirstReleasedSchemaInteroperates) {
  namespace v1 = ::pd::proto::capnp_v1;
  capnp::MallocMessageBuilder old_builder;
  auto om = old_builder.initRoot<v1::ControlMessage>().initManifest();
  om.setRequestId("req-old");
  om.setNumLayers(61);
  om.setNumTokens(4096);
  om.setChecksum(true);
  om.setMaxChunkBytes(1 << 20);
  kj::Array<capnp::word> words = capnp::messageToFlatArray(old_builder);
  auto bytes = words.asBytes();
  auto decoded = DecodePayload({bytes.begin(), bytes.size()});
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  const Manifest& m = std::get<Manifest>(*decoded);
  EXPECT_EQ(m.request_id, "req-old");
  EXPECT_EQ(m.num_tokens, 4096u);
  EXPECT_TRUE(m.checksum);
  EXPECT_EQ(m.sender_node, "");
  EXPECT_EQ(m.checksum_every, 0u);  // absent: the stream treats 0 as "every chunk"

  Manifest now = SampleManifest();
  now.sender_node = "prefill-1";
  now.checksum_every = 8;
  auto frame = EncodeFrame(now);
  ASSERT_TRUE(frame.ok());
  std::string payload = frame->substr(kFrameHeaderBytes);
  kj::Array<capnp::word> aligned = kj::heapArray<capnp::word>(payload.size() / 8);
  std::memcpy(aligned.begin(), payload.data(), payload.size());
  capnp::FlatArrayMessageReader reader(aligned.asPtr());
  auto root = reader.getRoot<v1::ControlMessage>();
  ASSERT_EQ(root.which(), v1::ControlMessage::MANIFEST);
  EXPECT_EQ(std::string(root.getManifest().getRequestId().cStr()), now.request_id);
  EXPECT_EQ(root.getManifest().getNumTokens(), now.num_tokens);
  EXPECT_EQ(root.getManifest().getSourcePages().size(), now.source_pages.size());

  // A message type v1 does not know is an unknown union member to it (which
  // the decoder rejects by name: UnknownUnionTagIsRejected).
  auto q = EncodeFrame(Quiesced{5});
  ASSERT_TRUE(q.ok());
  std::string qp = q->substr(kFrameHeaderBytes);
  kj::Array<capnp::word> qa = kj::heapArray<capnp::word>(qp.size() / 8);
  std::memcpy(qa.begin(), qp.data(), qp.size());
  capnp::FlatArrayMessageReader qreader(qa.asPtr());
  EXPECT_GT(uint16_t(qreader.getRoot<v1::ControlMessage>().which()), uint16_t(v1::ControlMessage::HEARTBEAT));
}

TEST(KvControlTest, AbortCarriesStatus) {
  absl::Status s = absl::DataLossError("chunk 3 corrupt");
  absl::Status back = AbortToStatus(StatusToAbort(s));
  EXPECT_EQ(back, s);
  EXPECT_EQ(AbortToStatus(Abort{999, "x"}).code(), absl::StatusCode::kUnknown);
}

TEST(KvControlTest, BadFrameHeadersAreNamed) {
  uint8_t h[8];
  uint32_t v[2] = {0x12345678, 16};
  std::memcpy(h, v, 8);
  auto s = DecodeFrameHeader(h);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("magic"), std::string::npos) << s.status();
  v[0] = kFrameMagic;
  v[1] = 12;  // not a multiple of 8
  std::memcpy(h, v, 8);
  EXPECT_NE(DecodeFrameHeader(h).status().message().find("length"), std::string::npos);
  v[1] = kMaxFramePayload + 8;
  std::memcpy(h, v, 8);
  EXPECT_FALSE(DecodeFrameHeader(h).ok());
  v[1] = 0;
  std::memcpy(h, v, 8);
  EXPECT_FALSE(DecodeFrameHeader(h).ok());
  EXPECT_FALSE(DecodeFrameHeader(std::span<const uint8_t>(h, 4)).ok());
}

TEST(KvControlTest, EncoderRejectsOutOfRangeEnums) {
  Manifest m = SampleManifest();
  m.objects[0].dtype = Dtype(77);
  EXPECT_EQ(EncodeFrame(m).status().code(), absl::StatusCode::kInvalidArgument);
}

// Untrusted bytes never crash the decoder: random payloads and every single-byte
// mutation of a valid frame either decode or fail with InvalidArgument.
TEST(KvControlTest, GarbageNeverCrashes) {
  std::mt19937_64 rng(7);
  for (int i = 0; i < 2000; ++i) {
    std::vector<uint8_t> junk(8 * (1 + rng() % 64));
    for (auto& b : junk) b = uint8_t(rng());
    auto r = DecodePayload(junk);
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    }
  }
  auto frame = EncodeFrame(SampleManifest());
  ASSERT_TRUE(frame.ok());
  std::string payload = frame->substr(kFrameHeaderBytes);
  int failures = 0;
  for (size_t pos = 0; pos < payload.size(); ++pos) {
    for (uint8_t flip : {uint8_t(0x01), uint8_t(0x80), uint8_t(0xff)}) {
      std::string p = payload;
      p[pos] = char(uint8_t(p[pos]) ^ flip);
      auto r = DecodePayload({reinterpret_cast<const uint8_t*>(p.data()), p.size()});
      if (!r.ok()) {
        ++failures;
        EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
        EXPECT_NE(r.status().message().find("malformed"), std::string::npos) << r.status();
      }
    }
  }
  EXPECT_GT(failures, 0);  // some mutations (segment table, pointers) must be caught
  // Truncations.
  for (size_t n = 8; n < payload.size(); n += 8) {
    auto r = DecodePayload({reinterpret_cast<const uint8_t*>(payload.data()), n});
    EXPECT_FALSE(r.ok());
  }
}

TEST(KvControlTest, HugeListsAreBounded) {
  // Lists above the decoder's element limit are rejected with a message naming the field.
  Accept big;
  big.page_table.assign((1u << 20) + 1, 3);
  auto big_frame = EncodeFrame(big);
  ASSERT_TRUE(big_frame.ok());
  auto r = DecodePayload(Payload(*big_frame));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("pageTable"), std::string::npos) << r.status();
}

TEST(KvControlTest, UnknownUnionTagIsRejected) {
  auto frame = EncodeFrame(Heartbeat{1});
  ASSERT_TRUE(frame.ok());
  std::string p = frame->substr(kFrameHeaderBytes);
  // Layout: 8-byte segment table, root pointer, then the root struct's data
  // section whose first 16 bits hold the union discriminant.
  p[16] = char(0x7f);
  auto r = DecodePayload({reinterpret_cast<const uint8_t*>(p.data()), p.size()});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("unknown message type"), std::string::npos) << r.status();
}

}  // namespace
}  // namespace pd::proto
