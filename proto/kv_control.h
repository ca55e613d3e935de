// The KV-stream control plane as plain C++ values, and its wire codec. The wire
// format is Cap'n Proto (kv_control.capnp); capnp/kj types never leave proto/.
// docs/kv-format.md describes the messages and the stream protocol.
#ifndef PD_PROTO_KV_CONTROL_H_
#define PD_PROTO_KV_CONTROL_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace pd::proto {

enum class Dtype : uint8_t { kNone = 0, kE4M3 = 1, kBf16 = 2, kFp32 = 3 };
// Same numbering as kvcache::KvObject.
enum class ObjectKind : uint8_t { kMlaLatent = 0, kIndexKey = 1, kSummary = 2 };
const char* ObjectKindName(ObjectKind k);

struct ObjectLayout {
  ObjectKind kind = ObjectKind::kMlaLatent;
  Dtype dtype = Dtype::kNone;
  uint32_t width = 0;
  Dtype scale_dtype = Dtype::kNone;
  uint32_t scale_group = 0;
  Dtype aux_dtype = Dtype::kNone;
  uint32_t aux_width = 0;
  uint64_t unit_bytes = 0;   // per token, or per summary block
  uint32_t unit_tokens = 0;  // 1, or the summary block size
  uint64_t page_bytes = 0;   // 0 for summaries
  bool operator==(const ObjectLayout&) const = default;
};
std::string DescribeLayout(const ObjectLayout& l);

struct Manifest {
  std::string request_id;
  std::string model_fingerprint;
  uint32_t num_layers = 0;
  uint64_t num_tokens = 0;
  uint32_t page_tokens = 0;
  std::vector<ObjectLayout> objects;
  std::string backend;
  std::string sender_info;
  uint64_t max_chunk_bytes = 0;
  bool staged = false;
  bool checksum = true;
  std::vector<int32_t> source_pages;
  std::string sender_node;      // may be empty (older senders)
  // With `checksum`: chunk ids that are multiples of this carry an XXH3-64 the
  // receiver verifies; the others carry 0 and are not hashed. 0 (older
  // senders) means 1: every chunk.
  uint32_t checksum_every = 1;
  bool operator==(const Manifest&) const = default;
};

struct Accept {
  std::string request_id;
  std::vector<int32_t> page_table;
  std::string receiver_info;
  std::vector<uint64_t> mla_offsets, index_offsets, summary_offsets;  // per layer
  uint32_t staging_slots = 0;
  uint64_t slot_bytes = 0;
  uint64_t credit_bytes = 0;
  uint32_t credit_chunks = 0;
  bool operator==(const Accept&) const = default;
};

struct ChunkHeader {
  uint32_t chunk_id = 0;
  uint32_t layer = 0;
  ObjectKind kind = ObjectKind::kMlaLatent;
  uint64_t token_begin = 0, token_end = 0;
  uint32_t page_begin = 0, page_count = 0;
  uint64_t bytes = 0;
  uint64_t checksum = 0;
  uint32_t attempt = 0;
  uint32_t slot = 0;
  bool operator==(const ChunkHeader&) const = default;
};

struct ChunkAck {
  uint32_t chunk_id = 0;
  bool ok = false;
  bool operator==(const ChunkAck&) const = default;
};

struct AckBatch {
  std::vector<ChunkAck> acks;
  uint64_t credit_bytes = 0;
  uint32_t credit_chunks = 0;
  bool operator==(const AckBatch&) const = default;
};

struct ChunkBatch {
  std::vector<ChunkHeader> chunks;
  bool operator==(const ChunkBatch&) const = default;
};

struct LayerReady {
  uint32_t layer = 0;
  bool operator==(const LayerReady&) const = default;
};

struct Done {
  uint32_t chunks = 0;
  uint64_t bytes = 0;
  bool operator==(const Done&) const = default;
};

// A stream abort; `code` is an absl::StatusCode.
struct Abort {
  uint32_t code = 0;
  std::string message;
  bool operator==(const Abort&) const = default;
};

struct Heartbeat {
  uint64_t seq = 0;
  bool operator==(const Heartbeat&) const = default;
};

// Sender -> receiver after a failed stream: no more writes will be posted and
// every posted write has landed (docs/kv-format.md, "Page quarantine").
struct Quiesced {
  uint64_t writes = 0;
  bool operator==(const Quiesced&) const = default;
};

using ControlMessage = std::variant<Manifest, Accept, ChunkBatch, AckBatch, LayerReady, Done, Abort,
                                    Heartbeat, Quiesced>;
const char* MessageName(const ControlMessage& m);

// Converts an Abort to the Status it carries (unknown codes become kUnknown) and back.
absl::Status AbortToStatus(const Abort& a);
Abort StatusToAbort(const absl::Status& s);

// --- Framing: "PDKV" magic, u32 little-endian payload length, payload. ---
inline constexpr size_t kFrameHeaderBytes = 8;
inline constexpr uint32_t kFrameMagic = 0x564b4450;  // "PDKV" little-endian
// Largest accepted payload. A page table of 2^20 pages is 4 MiB.
inline constexpr uint32_t kMaxFramePayload = 16u << 20;

// Serialises `msg` into one complete frame (header + payload).
// InvalidArgument when a field is out of range for the wire (e.g. an enum value).
absl::StatusOr<std::string> EncodeFrame(const ControlMessage& msg);

// Parses a frame header; returns the payload length. InvalidArgument (naming
// what is wrong) for a bad magic, a length that is not a multiple of 8, zero,
// or larger than kMaxFramePayload.
absl::StatusOr<uint32_t> DecodeFrameHeader(std::span<const uint8_t> header);

// Decodes one payload. Never crashes on untrusted bytes: the capnp reader runs
// with bounded traversal and nesting limits and every capnp exception becomes
// InvalidArgument ("malformed control message: ..."); enum values and list
// sizes are validated.
absl::StatusOr<ControlMessage> DecodePayload(std::span<const uint8_t> payload);

}  // namespace pd::proto

#endif  // PD_PROTO_KV_CONTROL_H_
