// Safetensors checkpoints: a zero-copy reader over memory-mapped shards and a
// streaming, sharding writer.
//
// File format (one shard): an 8-byte little-endian header length N, N bytes of
// JSON {"<tensor name>": {"dtype": "BF16", "shape": [r, c], "data_offsets":
// [begin, end]}, ..., "__metadata__": {"k": "v"}}, then the data area; offsets
// are relative to the data area. A checkpoint directory holds either
// model.safetensors.index.json ({"metadata": {"total_size": n}, "weight_map":
// {"<tensor name>": "<shard file name>"}}) plus the shards it names, or a single
// model.safetensors.
#ifndef PD_MODEL_SAFETENSORS_H_
#define PD_MODEL_SAFETENSORS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/mapped_file.h"
#include "kernels/tensor.h"

namespace pd::model {

inline constexpr char kSafetensorsIndexFile[] = "model.safetensors.index.json";
inline constexpr char kSafetensorsSingleFile[] = "model.safetensors";

// Parses a safetensors dtype name ("F32", "BF16", "F16", "F8_E4M3", "I32",
// "I64", "U8"). InvalidArgument naming the dtype for anything else.
absl::StatusOr<kernels::DType> ParseSafetensorsDType(absl::string_view name);

// "[2, 3]".
std::string ShapeString(const std::vector<int64_t>& shape);

// One tensor of an open checkpoint. `bytes` points into the shard's mapping
// (zero-copy) and stays valid while the checkpoint lives.
struct TensorInfo {
  std::string name;
  kernels::DType dtype = kernels::DType::kF32;
  std::vector<int64_t> shape;
  std::span<const uint8_t> bytes;  // DTypeSize(dtype) * NumElements() bytes
  int shard = 0;                   // index into SafetensorsCheckpoint::shard_path()

  int64_t NumElements() const;
};

// A read-only, memory-mapped safetensors checkpoint. Every shard is mapped and
// its header fully validated at Open; afterwards lookups are cheap and the
// object is immutable, hence safe to share between threads.
class SafetensorsCheckpoint {
 public:
  // Opens a checkpoint directory: model.safetensors.index.json and its shards
  // when the index exists, else model.safetensors. The index is authoritative:
  // tensors a shard holds but the index does not list are not exposed.
  // Errors (messages name the file and, where there is one, the tensor):
  //   NotFound: no index and no model.safetensors; a shard named by the index
  //     is missing; a tensor the index lists is absent from its shard.
  //   DataLoss: a file shorter than 8 bytes or whose header length runs past
  //     its end ("truncated"); a header or index that is not JSON or not of
  //     the expected shape; data_offsets that disagree with dtype and shape or
  //     run past the end of the file ("truncated: tensor X needs bytes [a, b)
  //     but shard has only n"); overlapping tensors.
  //   InvalidArgument: an unknown dtype.
  static absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> Open(const std::string& dir);
  // Opens a single .safetensors file (every tensor it holds), same errors.
  static absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> OpenFile(
      const std::string& path);

  ~SafetensorsCheckpoint();
  SafetensorsCheckpoint(const SafetensorsCheckpoint&) = delete;
  SafetensorsCheckpoint& operator=(const SafetensorsCheckpoint&) = delete;

  // nullptr when the checkpoint has no tensor `name`.
  const TensorInfo* Find(absl::string_view name) const;
  // NotFound "<source>: tensor <name> not found" when absent.
  absl::StatusOr<const TensorInfo*> Get(absl::string_view name) const;
  // Every tensor, in name order.
  const std::map<std::string, TensorInfo, std::less<>>& tensors() const { return tensors_; }

  // The index file, or the single .safetensors file, that was opened.
  const std::string& source() const { return source_; }
  // Shards are numbered in file-name order.
  int num_shards() const { return static_cast<int>(shards_.size()); }
  const std::string& shard_path(int shard) const { return shards_[shard].file.path(); }
  // The whole mapped shard file; every TensorInfo::bytes lies inside it.
  std::span<const uint8_t> shard_bytes(int shard) const { return shards_[shard].file.bytes(); }
  // The shard's file name without its directory ("model-00001-of-00003.safetensors").
  std::string ShardFileName(int shard) const;
  // The shard header's "__metadata__" (string values only, as the format says).
  const std::map<std::string, std::string>& shard_metadata(int shard) const {
    return shards_[shard].metadata;
  }
  // Sum of the exposed tensors' byte sizes.
  uint64_t total_tensor_bytes() const { return total_tensor_bytes_; }

  // Hex XXH3-128 (32 lowercase hex digits) over `salt` and then, for each
  // exposed tensor in name order, its name, dtype, shape and data. When
  // total_tensor_bytes() exceeds `full_hash_limit`, only part of each tensor's
  // data is hashed: a tensor of at most 6 MiB entirely, a larger one its first
  // and last 1 MiB plus 64 evenly spaced 64 KiB windows in between (so a
  // 700 GB checkpoint is fingerprinted without reading every byte; a change
  // outside the sampled bytes of a large tensor then goes unnoticed).
  static constexpr uint64_t kFingerprintFullHashLimit = uint64_t{4} << 30;
  std::string Fingerprint(absl::string_view salt,
                          uint64_t full_hash_limit = kFingerprintFullHashLimit) const;

 private:
  struct Shard {
    MappedFile file;
    std::map<std::string, std::string> metadata;
  };
  SafetensorsCheckpoint() = default;

  std::string source_;
  std::vector<Shard> shards_;
  std::map<std::string, TensorInfo, std::less<>> tensors_;
  uint64_t total_tensor_bytes_ = 0;
};

struct SafetensorsWriterOptions {
  // Upper bound on the tensor-data bytes of one shard. A tensor larger than the
  // bound gets a shard of its own (which then exceeds it).
  uint64_t max_shard_bytes = uint64_t{4} << 30;
  // Write one model.safetensors and no index (max_shard_bytes is ignored).
  bool single_file = false;
  // Every shard header's "__metadata__".
  std::map<std::string, std::string> metadata = {{"format", "pt"}};
};

// Writes a checkpoint directory tensor by tensor, never holding more than the
// bytes passed to one call. Shards are filled in order; when the next tensor
// would push a shard past max_shard_bytes a new shard starts. Tensors are stored
// contiguously in the order they are added (the format allows no gaps), so a
// caller that wants each tensor aligned to its element size adds tensors whose
// byte sizes are multiples of 8 (or orders them by decreasing element size).
// While a shard is open its data goes to a temporary file in `dir`; closing the
// shard writes the header and copies the data behind it (copy_file_range), so
// each byte is written twice. Finish names the shards
// model-0000i-of-0000n.safetensors and writes model.safetensors.index.json.
// Not thread-safe.
class SafetensorsWriter {
 public:
  // Creates `dir` (and its parents) when missing.
  static absl::StatusOr<std::unique_ptr<SafetensorsWriter>> Create(
      const std::string& dir, SafetensorsWriterOptions options = {});
  // Removes temporary files when Finish did not succeed.
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // A whole tensor: data.size() must be DTypeSize(dtype) * product(shape).
  absl::Status Add(absl::string_view name, kernels::DType dtype,
                   const std::vector<int64_t>& shape, std::span<const uint8_t> data);

  // Streaming form of Add: BeginTensor, Append the tensor's bytes in order (any
  // chunking), EndTensor. InvalidArgument for a duplicate or empty name,
  // negative dims, more bytes than the tensor holds, or EndTensor before all of
  // them; FailedPrecondition for calls out of order.
  absl::Status BeginTensor(absl::string_view name, kernels::DType dtype,
                           const std::vector<int64_t>& shape);
  absl::Status Append(std::span<const uint8_t> data);
  absl::Status EndTensor();

  // Closes the last shard, renames the shards to their final names and writes
  // the index (unless single_file). Returns the shard file names in order. No
  // call is allowed afterwards.
  absl::StatusOr<std::vector<std::string>> Finish();

 private:
  struct Entry {
    std::string name;
    kernels::DType dtype;
    std::vector<int64_t> shape;
    uint64_t begin, end;
  };
  struct OpenShard;

  SafetensorsWriter(std::string dir, SafetensorsWriterOptions options);
  absl::Status StartShard();
  absl::Status CloseShard();
  std::string TempDataPath(int shard) const;
  std::string TempShardPath(int shard) const;

  std::string dir_;
  SafetensorsWriterOptions options_;
  std::set<std::string, std::less<>> names_;
  std::vector<std::vector<std::string>> closed_shard_tensors_;  // per closed shard
  uint64_t total_bytes_ = 0;
  std::unique_ptr<OpenShard> shard_;  // the shard being filled, if any
  bool in_tensor_ = false;
  uint64_t tensor_expected_ = 0, tensor_written_ = 0;
  bool finished_ = false;
};

}  // namespace pd::model

#endif  // PD_MODEL_SAFETENSORS_H_
