#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <utility>

#include <boost/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status.h"
#include "model/json_util.h"

namespace pd::model {
namespace {

namespace json = boost::json;
using internal::JsonKindName;
using internal::ToAbslView;
using internal::ToJsonView;

// safetensors' own limit on the header size (MAX_HEADER_SIZE in the reference
// implementation); a larger value is treated as corruption.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

constexpr kernels::DType kAllDTypes[] = {
    kernels::DType::kFP8E4M3, kernels::DType::kBF16, kernels::DType::kF16, kernels::DType::kF32,
    kernels::DType::kI32,    kernels::DType::kI64,  kernels::DType::kU8};

std::string BaseName(const std::string& path) {
  return std::filesystem::path(path).filename().string();
}

std::string JoinPath(const std::string& dir, absl::string_view name) {
  return (std::filesystem::path(dir) / std::string(name)).string();
}

absl::Status ErrnoError(absl::string_view what, const std::string& path, int err) {
  std::string msg = absl::StrCat(what, " ", path, ": ", std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(msg);
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
  return absl::InternalError(msg);
}

// Multiplies the dims of `shape` into the element count; false on overflow.
bool ElementCount(const std::vector<int64_t>& shape, uint64_t* out) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (d != 0 && n > std::numeric_limits<uint64_t>::max() / uint64_t(d)) return false;
    n *= uint64_t(d);
  }
  *out = n;
  return true;
}

bool ByteCount(kernels::DType dtype, const std::vector<int64_t>& shape, uint64_t* out) {
  uint64_t n;
  if (!ElementCount(shape, &n)) return false;
  const uint64_t size = kernels::DTypeSize(dtype);
  if (n > std::numeric_limits<uint64_t>::max() / size) return false;
  *out = n * size;
  return true;
}

// A non-negative JSON integer (header offsets and dims).
bool JsonToU64(const json::value& v, uint64_t* out) {
  if (v.is_uint64()) {
    *out = v.get_uint64();
    return true;
  }
  if (v.is_int64() && v.get_int64() >= 0) {
    *out = uint64_t(v.get_int64());
    return true;
  }
  return false;
}

absl::StatusOr<json::value> ParseJsonOrDataLoss(absl::string_view text, const std::string& path,
                                                absl::string_view what) {
  boost::system::error_code ec;
  json::value v = json::parse(ToJsonView(text), ec);
  if (ec) {
    return absl::DataLossError(absl::StrCat(path, ": ", what, " is not valid JSON (",
                                            ec.message(), ")"));
  }
  return v;
}

// Parsed header entry of one tensor.
struct RawTensor {
  std::string name;
  kernels::DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;  // relative to the data area
};

// Parses and validates a shard's header. `shard_index` is stored in each
// tensor; `metadata` receives "__metadata__".
absl::Status ParseShard(const MappedFile& file, int shard_index,
                        std::map<std::string, std::string>* metadata,
                        std::vector<TensorInfo>* out) {
  const std::string& path = file.path();
  const uint64_t size = file.size();
  if (size < 8) {
    return absl::DataLossError(absl::StrCat(path, ": truncated: the file has ", size,
                                            " bytes, fewer than the 8-byte header length"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | file.data()[i];
  if (header_len > size - 8) {
    return absl::DataLossError(absl::StrCat(path, ": truncated: header length ", header_len,
                                            " runs past the end of the file (", size - 8,
                                            " bytes follow the length field)"));
  }
  if (header_len > kMaxHeaderBytes) {
    return absl::DataLossError(absl::StrCat(path, ": header length ", header_len,
                                            " exceeds the format's limit of ",
                                            kMaxHeaderBytes, " bytes"));
  }
  absl::string_view header_text(reinterpret_cast<const char*>(file.data()) + 8,
                                size_t(header_len));
  PD_ASSIGN_OR_RETURN(json::value header, ParseJsonOrDataLoss(header_text, path, "header"));
  if (!header.is_object()) {
    return absl::DataLossError(absl::StrCat(path, ": header must be a JSON object, got ",
                                            JsonKindName(header)));
  }
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = size - data_start;
  std::vector<RawTensor> raw;
  for (const auto& kv : header.get_object()) {
    const std::string name(ToAbslView(kv.key()));
    if (name == "__metadata__") {
      if (!kv.value().is_object()) {
        return absl::DataLossError(absl::StrCat(path, ": __metadata__ must be an object, got ",
                                                JsonKindName(kv.value())));
      }
      for (const auto& m : kv.value().get_object()) {
        if (!m.value().is_string()) {
          return absl::DataLossError(absl::StrCat(path, ": __metadata__ value '",
                                                  ToAbslView(m.key()), "' must be a string, got ",
                                                  JsonKindName(m.value())));
        }
        (*metadata)[std::string(ToAbslView(m.key()))] =
            std::string(ToAbslView(m.value().get_string()));
      }
      continue;
    }
    const std::string where = absl::StrCat(path, ": tensor ", name);
    if (!kv.value().is_object()) {
      return absl::DataLossError(
          absl::StrCat(where, ": header entry must be an object, got ", JsonKindName(kv.value())));
    }
    const json::object& e = kv.value().get_object();
    const json::value* dtype_v = e.if_contains("dtype");
    const json::value* shape_v = e.if_contains("shape");
    const json::value* offsets_v = e.if_contains("data_offsets");
    if (dtype_v == nullptr || !dtype_v->is_string()) {
      return absl::DataLossError(absl::StrCat(where, ": 'dtype' must be a string"));
    }
    if (shape_v == nullptr || !shape_v->is_array()) {
      return absl::DataLossError(absl::StrCat(where, ": 'shape' must be an array"));
    }
    if (offsets_v == nullptr || !offsets_v->is_array() || offsets_v->get_array().size() != 2) {
      return absl::DataLossError(
          absl::StrCat(where, ": 'data_offsets' must be an array [begin, end]"));
    }
    RawTensor t;
    t.name = name;
    absl::StatusOr<kernels::DType> dtype = ParseSafetensorsDType(ToAbslView(dtype_v->get_string()));
    if (!dtype.ok()) return Annotate(dtype.status(), where);
    t.dtype = *dtype;
    for (const json::value& d : shape_v->get_array()) {
      uint64_t dim;
      if (!JsonToU64(d, &dim) || dim > uint64_t(std::numeric_limits<int64_t>::max())) {
        return absl::DataLossError(
            absl::StrCat(where, ": 'shape' must hold non-negative integers"));
      }
      t.shape.push_back(int64_t(dim));
    }
    if (!JsonToU64(offsets_v->get_array()[0], &t.begin) ||
        !JsonToU64(offsets_v->get_array()[1], &t.end) || t.end < t.begin) {
      return absl::DataLossError(absl::StrCat(
          where, ": 'data_offsets' must be non-negative integers [begin, end] with begin <= end"));
    }
    uint64_t need;
    if (!ByteCount(t.dtype, t.shape, &need)) {
      return absl::DataLossError(absl::StrCat(where, ": shape ", ShapeString(t.shape),
                                              " overflows a 64-bit byte count"));
    }
    if (t.end - t.begin != need) {
      return absl::DataLossError(absl::StrCat(
          where, ": data_offsets [", t.begin, ", ", t.end, ") hold ", t.end - t.begin,
          " bytes, but dtype ", kernels::DTypeName(t.dtype), " and shape ",
          ShapeString(t.shape), " need ", need));
    }
    if (t.end > data_size) {
      return absl::DataLossError(absl::StrCat(
          path, ": truncated: tensor ", name, " needs bytes [", data_start + t.begin, ", ",
          data_start + t.end, ") but shard has only ", size));
    }
    raw.push_back(std::move(t));
  }
  // Overlap check: sort by begin; empty tensors occupy no bytes.
  std::vector<const RawTensor*> order;
  for (const RawTensor& t : raw) {
    if (t.end > t.begin) order.push_back(&t);
  }
  std::sort(order.begin(), order.end(), [](const RawTensor* a, const RawTensor* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->name < b->name;
  });
  for (size_t i = 1; i < order.size(); ++i) {
    const RawTensor* a = order[i - 1];
    const RawTensor* b = order[i];
    if (b->begin < a->end) {
      return absl::DataLossError(absl::StrCat(path, ": tensors ", a->name, " [", a->begin, ", ",
                                              a->end, ") and ", b->name, " [", b->begin, ", ",
                                              b->end, ") overlap"));
    }
  }
  for (RawTensor& t : raw) {
    TensorInfo info;
    info.name = std::move(t.name);
    info.dtype = t.dtype;
    info.shape = std::move(t.shape);
    info.bytes = std::span<const uint8_t>(file.data() + data_start + t.begin,
                                          size_t(t.end - t.begin));
    info.shard = shard_index;
    out->push_back(std::move(info));
  }
  return absl::OkStatus();
}

// ---- small POSIX file owner for the writer ----
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~UniqueFd() { Reset(); }
  int get() const { return fd_; }
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  // close(2) with its error reported (data may be lost on some filesystems).
  absl::Status Close(const std::string& path) {
    int fd = std::exchange(fd_, -1);
    if (fd >= 0 && ::close(fd) != 0) return ErrnoError("close", path, errno);
    return absl::OkStatus();
  }

 private:
  int fd_ = -1;
};

absl::StatusOr<UniqueFd> CreateFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("create", path, errno);
  return UniqueFd(fd);
}

absl::Status WriteAll(int fd, const uint8_t* data, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, data, std::min<size_t>(n, size_t{1} << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("write", path, errno);
    }
    data += w;
    n -= size_t(w);
  }
  return absl::OkStatus();
}

// Appends all of `src_path` to `dst` (in-kernel copy when possible).
absl::Status AppendFile(const std::string& src_path, int dst, const std::string& dst_path) {
  int src = ::open(src_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (src < 0) return ErrnoError("open", src_path, errno);
  UniqueFd src_owner(src);
  bool fallback = false;
  while (!fallback) {
    ssize_t n = ::copy_file_range(src, nullptr, dst, nullptr, size_t{1} << 30, 0);
    if (n == 0) return absl::OkStatus();
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP) {
        fallback = true;  // the file offsets are unchanged by a failed call
        break;
      }
      return ErrnoError(absl::StrCat("copy_file_range to ", dst_path, " from"), src_path, errno);
    }
  }
  std::vector<uint8_t> buf(size_t{8} << 20);
  while (true) {
    ssize_t n = ::read(src, buf.data(), buf.size());
    if (n == 0) return absl::OkStatus();
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("read", src_path, errno);
    }
    PD_RETURN_IF_ERROR(WriteAll(dst, buf.data(), size_t(n), dst_path));
  }
}

}  // namespace

// ---------------------------------------------------------------- helpers

absl::StatusOr<kernels::DType> ParseSafetensorsDType(absl::string_view name) {
  for (kernels::DType t : kAllDTypes) {
    if (name == kernels::DTypeName(t)) return t;
  }
  std::vector<std::string> names;
  for (kernels::DType t : kAllDTypes) names.push_back(kernels::DTypeName(t));
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype \"", name, "\" (supported: ",
                                                 absl::StrJoin(names, ", "), ")"));
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

int64_t TensorInfo::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// ---------------------------------------------------------------- reader

SafetensorsCheckpoint::~SafetensorsCheckpoint() = default;

absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> SafetensorsCheckpoint::OpenFile(
    const std::string& path) {
  std::unique_ptr<SafetensorsCheckpoint> ckpt(new SafetensorsCheckpoint());
  ckpt->source_ = path;
  PD_ASSIGN_OR_RETURN(MappedFile file, MappedFile::Open(path));
  ckpt->shards_.push_back(Shard{std::move(file), {}});
  std::vector<TensorInfo> infos;
  PD_RETURN_IF_ERROR(ParseShard(ckpt->shards_[0].file, 0, &ckpt->shards_[0].metadata, &infos));
  for (TensorInfo& t : infos) {
    ckpt->total_tensor_bytes_ += t.bytes.size();
    std::string name = t.name;
    ckpt->tensors_.emplace(std::move(name), std::move(t));
  }
  return ckpt;
}

absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> SafetensorsCheckpoint::Open(
    const std::string& dir) {
  const std::string index_path = JoinPath(dir, kSafetensorsIndexFile);
  const std::string single_path = JoinPath(dir, kSafetensorsSingleFile);
  std::error_code ec;
  if (!std::filesystem::exists(index_path, ec)) {
    if (std::filesystem::exists(single_path, ec)) return OpenFile(single_path);
    return absl::NotFoundError(absl::StrCat(dir, ": no safetensors checkpoint (neither ",
                                            kSafetensorsIndexFile, " nor ",
                                            kSafetensorsSingleFile, " exists)"));
  }
  PD_ASSIGN_OR_RETURN(std::string index_text, ReadFileToString(index_path));
  PD_ASSIGN_OR_RETURN(json::value index,
                      ParseJsonOrDataLoss(index_text, index_path, "the index"));
  const json::value* map_v = index.is_object() ? index.get_object().if_contains("weight_map")
                                               : nullptr;
  if (map_v == nullptr || !map_v->is_object()) {
    return absl::DataLossError(
        absl::StrCat(index_path, ": must be a JSON object with a \"weight_map\" object"));
  }
  std::unique_ptr<SafetensorsCheckpoint> ckpt(new SafetensorsCheckpoint());
  ckpt->source_ = index_path;
  // Shard file name -> its tensors (in index order).
  std::vector<std::string> shard_names;
  std::map<std::string, std::vector<std::string>> wanted;
  for (const auto& kv : map_v->get_object()) {
    const std::string tensor(ToAbslView(kv.key()));
    if (!kv.value().is_string()) {
      return absl::DataLossError(absl::StrCat(index_path, ": weight_map entry for tensor ",
                                              tensor, " must be a string, got ",
                                              JsonKindName(kv.value())));
    }
    std::string shard(ToAbslView(kv.value().get_string()));
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
      return absl::DataLossError(absl::StrCat(index_path, ": tensor ", tensor,
                                              " maps to \"", shard,
                                              "\", which is not a plain file name"));
    }
    auto [it, inserted] = wanted.try_emplace(shard);
    if (inserted) shard_names.push_back(shard);
    it->second.push_back(tensor);
  }
  // Shards in file-name order (model-00001-of-n first).
  std::sort(shard_names.begin(), shard_names.end());
  for (const std::string& shard_name : shard_names) {
    const std::vector<std::string>& names = wanted[shard_name];
    const int shard_index = static_cast<int>(ckpt->shards_.size());
    absl::StatusOr<MappedFile> file = MappedFile::Open(JoinPath(dir, shard_name));
    if (!file.ok()) {
      if (absl::IsNotFound(file.status())) {
        return absl::NotFoundError(absl::StrCat(index_path, ": shard ", shard_name,
                                                " (holding tensor ", names.front(), " and ",
                                                names.size() - 1,
                                                " more) is missing: ", file.status().message()));
      }
      return Annotate(file.status(), index_path);
    }
    ckpt->shards_.push_back(Shard{*std::move(file), {}});
    Shard& shard = ckpt->shards_.back();
    std::vector<TensorInfo> infos;
    PD_RETURN_IF_ERROR(ParseShard(shard.file, shard_index, &shard.metadata, &infos));
    std::map<std::string, TensorInfo*, std::less<>> by_name;
    for (TensorInfo& t : infos) by_name[t.name] = &t;
    for (const std::string& name : names) {
      auto it = by_name.find(name);
      if (it == by_name.end()) {
        return absl::NotFoundError(absl::StrCat(index_path, ": tensor ", name,
                                                " is mapped to shard ", shard_name,
                                                ", which does not contain it"));
      }
      ckpt->total_tensor_bytes_ += it->second->bytes.size();
      ckpt->tensors_.emplace(name, std::move(*it->second));
    }
    if (infos.size() > names.size()) {
      VLOG(1) << shard.file.path() << ": " << infos.size() - names.size()
              << " tensor(s) not listed in the index are ignored";
    }
  }
  return ckpt;
}

const TensorInfo* SafetensorsCheckpoint::Find(absl::string_view name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::StatusOr<const TensorInfo*> SafetensorsCheckpoint::Get(absl::string_view name) const {
  const TensorInfo* t = Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrCat(source_, ": tensor ", name, " not found"));
  }
  return t;
}

std::string SafetensorsCheckpoint::ShardFileName(int shard) const {
  return BaseName(shards_[shard].file.path());
}

std::string SafetensorsCheckpoint::Fingerprint(absl::string_view salt,
                                               uint64_t full_hash_limit) const {
  constexpr uint64_t kEdge = uint64_t{1} << 20;     // first and last 1 MiB
  constexpr uint64_t kWindow = uint64_t{64} << 10;  // 64 KiB windows
  constexpr uint64_t kWindows = 64;
  constexpr uint64_t kSampleBytes = 2 * kEdge + kWindows * kWindow;  // 6 MiB
  const bool sampled = total_tensor_bytes_ > full_hash_limit;

  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(),
                                                                   &XXH3_freeState);
  CHECK(state != nullptr) << "XXH3_createState failed";
  XXH3_128bits_reset(state.get());
  auto put = [&](const void* p, size_t n) { XXH3_128bits_update(state.get(), p, n); };
  auto put_u64 = [&](uint64_t v) {
    uint8_t b[8];
    for (int i = 0; i < 8; ++i) b[i] = uint8_t(v >> (8 * i));
    put(b, 8);
  };
  auto put_str = [&](absl::string_view s) {
    put_u64(s.size());
    put(s.data(), s.size());
  };
  put_str(sampled ? "pd-fingerprint-v1/sampled" : "pd-fingerprint-v1/full");
  put_str(salt);
  put_u64(tensors_.size());
  for (const auto& [name, t] : tensors_) {
    put_str(name);
    put_str(kernels::DTypeName(t.dtype));
    put_u64(t.shape.size());
    for (int64_t d : t.shape) put_u64(uint64_t(d));
    const uint64_t n = t.bytes.size();
    put_u64(n);
    const uint8_t* p = t.bytes.data();
    if (!sampled || n <= kSampleBytes) {
      put(p, n);
      continue;
    }
    put(p, kEdge);
    const uint64_t span = n - 2 * kEdge - kWindow;  // window starts in [kEdge, kEdge + span]
    for (uint64_t i = 0; i < kWindows; ++i) {
      put(p + kEdge + i * span / (kWindows - 1), kWindow);
    }
    put(p + n - kEdge, kEdge);
  }
  XXH128_hash_t h = XXH3_128bits_digest(state.get());
  return absl::StrFormat("%016x%016x", h.high64, h.low64);
}

// ---------------------------------------------------------------- writer

struct SafetensorsWriter::OpenShard {
  int index = 0;
  UniqueFd data_fd;
  std::string data_path;
  std::vector<Entry> entries;
  uint64_t bytes = 0;
};

SafetensorsWriter::SafetensorsWriter(std::string dir, SafetensorsWriterOptions options)
    : dir_(std::move(dir)), options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Create(
    const std::string& dir, SafetensorsWriterOptions options) {
  if (options.max_shard_bytes == 0) {
    return absl::InvalidArgumentError("SafetensorsWriter: max_shard_bytes must be > 0");
  }
  for (const auto& [k, v] : options.metadata) {
    (void)v;
    if (k.empty()) return absl::InvalidArgumentError("SafetensorsWriter: empty metadata key");
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("create directory ", dir, ": ", ec.message()));
  }
  return std::unique_ptr<SafetensorsWriter>(new SafetensorsWriter(dir, std::move(options)));
}

SafetensorsWriter::~SafetensorsWriter() {
  if (finished_) return;
  std::error_code ec;
  if (shard_ != nullptr) {
    shard_->data_fd.Reset();
    std::filesystem::remove(shard_->data_path, ec);
  }
  for (size_t i = 0; i < closed_shard_tensors_.size(); ++i) {
    std::filesystem::remove(TempShardPath(int(i)), ec);
  }
}

std::string SafetensorsWriter::TempDataPath(int shard) const {
  return JoinPath(dir_, absl::StrCat(".shard-", shard, ".data.tmp"));
}

std::string SafetensorsWriter::TempShardPath(int shard) const {
  return JoinPath(dir_, absl::StrCat(".shard-", shard, ".safetensors.tmp"));
}

absl::Status SafetensorsWriter::StartShard() {
  auto shard = std::make_unique<OpenShard>();
  shard->index = static_cast<int>(closed_shard_tensors_.size());
  shard->data_path = TempDataPath(shard->index);
  PD_ASSIGN_OR_RETURN(shard->data_fd, CreateFile(shard->data_path));
  shard_ = std::move(shard);
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::CloseShard() {
  OpenShard& s = *shard_;
  PD_RETURN_IF_ERROR(s.data_fd.Close(s.data_path));
  json::object header;
  if (!options_.metadata.empty()) {
    json::object meta;
    for (const auto& [k, v] : options_.metadata) meta[ToJsonView(k)] = ToJsonView(v);
    header["__metadata__"] = std::move(meta);
  }
  std::vector<std::string> names;
  for (const Entry& e : s.entries) {
    json::object t;
    t["dtype"] = kernels::DTypeName(e.dtype);
    json::array shape;
    for (int64_t d : e.shape) shape.push_back(d);
    t["shape"] = std::move(shape);
    t["data_offsets"] = json::array{e.begin, e.end};
    header[ToJsonView(e.name)] = std::move(t);
    names.push_back(e.name);
  }
  std::string text = json::serialize(header);
  // Pad with spaces so the data area starts 8-byte aligned (as the reference
  // implementation does).
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string prefix(8, '\0');
  for (int i = 0; i < 8; ++i) prefix[i] = char(uint64_t(text.size()) >> (8 * i));
  prefix += text;

  const std::string path = TempShardPath(s.index);
  PD_ASSIGN_OR_RETURN(UniqueFd fd, CreateFile(path));
  PD_RETURN_IF_ERROR(
      WriteAll(fd.get(), reinterpret_cast<const uint8_t*>(prefix.data()), prefix.size(), path));
  PD_RETURN_IF_ERROR(AppendFile(s.data_path, fd.get(), path));
  PD_RETURN_IF_ERROR(fd.Close(path));
  std::error_code ec;
  std::filesystem::remove(s.data_path, ec);
  closed_shard_tensors_.push_back(std::move(names));
  shard_.reset();
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::BeginTensor(absl::string_view name, kernels::DType dtype,
                                            const std::vector<int64_t>& shape) {
  if (finished_) return absl::FailedPreconditionError("SafetensorsWriter: already finished");
  if (in_tensor_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "SafetensorsWriter: BeginTensor(", name, ") while another tensor is open"));
  }
  if (name.empty() || name == "__metadata__") {
    return absl::InvalidArgumentError(
        absl::StrCat("SafetensorsWriter: invalid tensor name \"", name, "\""));
  }
  if (names_.count(name) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("SafetensorsWriter: duplicate tensor ", name));
  }
  uint64_t bytes;
  if (!ByteCount(dtype, shape, &bytes)) {
    return absl::InvalidArgumentError(absl::StrCat("SafetensorsWriter: tensor ", name,
                                                   " has invalid shape ", ShapeString(shape)));
  }
  if (shard_ != nullptr && !options_.single_file && shard_->bytes > 0 &&
      shard_->bytes + bytes > options_.max_shard_bytes) {
    PD_RETURN_IF_ERROR(CloseShard());
  }
  if (shard_ == nullptr) PD_RETURN_IF_ERROR(StartShard());
  shard_->entries.push_back(Entry{std::string(name), dtype, shape, shard_->bytes,
                                  shard_->bytes + bytes});
  shard_->bytes += bytes;
  total_bytes_ += bytes;
  names_.insert(std::string(name));
  in_tensor_ = true;
  tensor_expected_ = bytes;
  tensor_written_ = 0;
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Append(std::span<const uint8_t> data) {
  if (!in_tensor_) {
    return absl::FailedPreconditionError("SafetensorsWriter: Append without BeginTensor");
  }
  if (data.size() > tensor_expected_ - tensor_written_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SafetensorsWriter: tensor ", shard_->entries.back().name, " holds ", tensor_expected_,
        " bytes; appending ", data.size(), " after ", tensor_written_, " exceeds that"));
  }
  PD_RETURN_IF_ERROR(WriteAll(shard_->data_fd.get(), data.data(), data.size(), shard_->data_path));
  tensor_written_ += data.size();
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::EndTensor() {
  if (!in_tensor_) {
    return absl::FailedPreconditionError("SafetensorsWriter: EndTensor without BeginTensor");
  }
  if (tensor_written_ != tensor_expected_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SafetensorsWriter: tensor ", shard_->entries.back().name, " holds ", tensor_expected_,
        " bytes but only ", tensor_written_, " were appended"));
  }
  in_tensor_ = false;
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Add(absl::string_view name, kernels::DType dtype,
                                    const std::vector<int64_t>& shape,
                                    std::span<const uint8_t> data) {
  PD_RETURN_IF_ERROR(BeginTensor(name, dtype, shape));
  PD_RETURN_IF_ERROR(Append(data));
  return EndTensor();
}

absl::StatusOr<std::vector<std::string>> SafetensorsWriter::Finish() {
  if (finished_) return absl::FailedPreconditionError("SafetensorsWriter: already finished");
  if (in_tensor_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "SafetensorsWriter: Finish while tensor ", shard_->entries.back().name, " is open"));
  }
  if (shard_ == nullptr && closed_shard_tensors_.empty()) PD_RETURN_IF_ERROR(StartShard());
  if (shard_ != nullptr) PD_RETURN_IF_ERROR(CloseShard());
  const int n = static_cast<int>(closed_shard_tensors_.size());
  std::vector<std::string> files;
  std::map<std::string, std::string> weight_map;
  for (int i = 0; i < n; ++i) {
    std::string file = options_.single_file
                           ? std::string(kSafetensorsSingleFile)
                           : absl::StrFormat("model-%05d-of-%05d.safetensors", i + 1, n);
    const std::string final_path = JoinPath(dir_, file);
    if (std::rename(TempShardPath(i).c_str(), final_path.c_str()) != 0) {
      return ErrnoError("rename to", final_path, errno);
    }
    for (const std::string& t : closed_shard_tensors_[i]) weight_map[t] = file;
    files.push_back(std::move(file));
  }
  finished_ = true;
  if (options_.single_file) return files;
  json::object index;
  json::object meta;
  meta["total_size"] = total_bytes_;
  index["metadata"] = std::move(meta);
  json::object map;
  for (const auto& [t, f] : weight_map) map[ToJsonView(t)] = ToJsonView(f);
  index["weight_map"] = std::move(map);
  PD_RETURN_IF_ERROR(
      WriteStringToFile(JoinPath(dir_, kSafetensorsIndexFile), internal::PrettyJson(index)));
  return files;
}

}  // namespace pd::model
