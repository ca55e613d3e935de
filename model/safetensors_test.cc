#include "model/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/mapped_file.h"

namespace pd::model {
namespace {

using kernels::DType;
using ::testing::HasSubstr;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = absl::StrCat(::testing::TempDir(), "/st_", info->name(), "_", ::getpid());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  std::string dir_;
};

std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = uint8_t(rng());
  return v;
}

std::string ReadAll(const std::string& path) {
  absl::StatusOr<std::string> s = ReadFileToString(path);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : std::string();
}

void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// A shard built by hand (independently of SafetensorsWriter): length, header, data.
std::string HandShard(const std::string& header, const std::string& data) {
  std::string s(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) s[i] = char(n >> (8 * i));
  return s + header + data;
}

uint64_t HeaderLength(const std::string& file) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(file[i]);
  return n;
}

struct Expected {
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;
};

TEST_F(SafetensorsTest, RoundTripAcrossShardsIsZeroCopy) {
  // Byte sizes are multiples of 8 so every tensor stays aligned.
  std::map<std::string, Expected> want;
  auto add = [&](const std::string& name, DType dtype, std::vector<int64_t> shape) {
    size_t n = kernels::DTypeSize(dtype);
    for (int64_t d : shape) n *= size_t(d);
    want[name] = Expected{dtype, shape, RandomBytes(n, want.size() + 1)};
  };
  add("model.embed_tokens.weight", DType::kBF16, {16, 20});     // 640
  add("model.layers.0.q.weight", DType::kFP8E4M3, {32, 32});    // 1024 > limit: own shard
  add("model.layers.0.q.weight_scale_inv", DType::kF32, {1, 2});  // 8
  add("model.layers.0.norm.weight", DType::kF32, {10, 10});     // 400
  add("model.layers.0.f16", DType::kF16, {4, 6});               // 48
  add("ids.i32", DType::kI32, {6});                             // 24
  add("ids.i64", DType::kI64, {5});                             // 40
  add("raw.u8", DType::kU8, {2, 2, 2});                         // 8
  add("empty", DType::kF32, {0, 3});                            // 0
  add("scalar", DType::kF32, {});                               // 4 (one element)
  add("lm_head.weight", DType::kBF16, {20, 16});                // 640

  SafetensorsWriterOptions options;
  options.max_shard_bytes = 700;
  absl::StatusOr<std::unique_ptr<SafetensorsWriter>> w = SafetensorsWriter::Create(dir_, options);
  ASSERT_TRUE(w.ok()) << w.status();
  // Insertion order = file order; "scalar" (4 bytes) last keeps the rest aligned.
  const std::vector<std::string> order = {
      "model.embed_tokens.weight", "model.layers.0.q.weight", "model.layers.0.q.weight_scale_inv",
      "model.layers.0.norm.weight", "model.layers.0.f16", "ids.i32", "ids.i64", "raw.u8", "empty",
      "lm_head.weight", "scalar"};
  for (const std::string& name : order) {
    const Expected& e = want[name];
    if (name == "lm_head.weight") {  // streamed in uneven chunks
      ASSERT_TRUE((*w)->BeginTensor(name, e.dtype, e.shape).ok());
      size_t pos = 0;
      for (size_t chunk : {1u, 100u, 7u, 532u}) {
        ASSERT_TRUE((*w)->Append({e.data.data() + pos, chunk}).ok());
        pos += chunk;
      }
      ASSERT_EQ(pos, e.data.size());
      ASSERT_TRUE((*w)->EndTensor().ok());
    } else {
      absl::Status s = (*w)->Add(name, e.dtype, e.shape, e.data);
      ASSERT_TRUE(s.ok()) << s;
    }
  }
  absl::StatusOr<std::vector<std::string>> files = (*w)->Finish();
  ASSERT_TRUE(files.ok()) << files.status();
  ASSERT_GE(files->size(), 3u);
  for (size_t i = 0; i < files->size(); ++i) {
    EXPECT_EQ((*files)[i], absl::StrFormat("model-%05d-of-%05d.safetensors", i + 1,
                                           files->size()));
  }
  // No temporary files are left behind.
  int entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir_)) {
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
    ++entries;
  }
  EXPECT_EQ(entries, int(files->size()) + 1);

  absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ck = SafetensorsCheckpoint::Open(dir_);
  ASSERT_TRUE(ck.ok()) << ck.status();
  EXPECT_EQ((*ck)->source(), Path(kSafetensorsIndexFile));
  EXPECT_EQ((*ck)->num_shards(), int(files->size()));
  ASSERT_EQ((*ck)->tensors().size(), want.size());
  uint64_t total = 0;
  std::vector<uint64_t> shard_data(files->size(), 0);
  for (const auto& [name, e] : want) {
    const TensorInfo* t = (*ck)->Find(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->name, name);
    EXPECT_EQ(t->dtype, e.dtype) << name;
    EXPECT_EQ(t->shape, e.shape) << name;
    ASSERT_EQ(t->bytes.size(), e.data.size()) << name;
    EXPECT_EQ(std::memcmp(t->bytes.data(), e.data.data(), e.data.size()), 0) << name;
    // Zero-copy: the span lies inside the shard's mapping, at the position the
    // file itself holds these bytes.
    std::span<const uint8_t> map = (*ck)->shard_bytes(t->shard);
    ASSERT_GE(t->bytes.data(), map.data()) << name;
    ASSERT_LE(t->bytes.data() + t->bytes.size(), map.data() + map.size()) << name;
    const std::string file = ReadAll((*ck)->shard_path(t->shard));
    const size_t offset = size_t(t->bytes.data() - map.data());
    EXPECT_EQ(file.compare(offset, e.data.size(),
                           std::string(e.data.begin(), e.data.end())), 0) << name;
    EXPECT_EQ(offset % std::max<size_t>(kernels::DTypeSize(e.dtype), 1), 0u) << name;
    total += e.data.size();
    shard_data[t->shard] += e.data.size();
  }
  EXPECT_EQ((*ck)->total_tensor_bytes(), total);
  for (int s = 0; s < (*ck)->num_shards(); ++s) {
    // Either within the limit or a single oversized tensor; and the file is
    // exactly length field + 8-aligned header + contiguous data (no holes).
    const std::string file = ReadAll((*ck)->shard_path(s));
    const uint64_t n = HeaderLength(file);
    EXPECT_EQ((8 + n) % 8, 0u);
    EXPECT_EQ(file.size(), 8 + n + shard_data[s]) << s;
    EXPECT_EQ((*ck)->shard_metadata(s).at("format"), "pt");
    if (shard_data[s] > options.max_shard_bytes) {
      EXPECT_EQ(shard_data[s], 1024u);
    }
  }
  const TensorInfo* q = (*ck)->Find("model.layers.0.q.weight");
  EXPECT_EQ((*ck)->ShardFileName(q->shard), (*files)[q->shard]);
  EXPECT_EQ((*ck)->Find("nope"), nullptr);
  absl::StatusOr<const TensorInfo*> missing = (*ck)->Get("nope");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("nope"));
  EXPECT_THAT(missing.status().message(), HasSubstr(kSafetensorsIndexFile));

  // The index lists every tensor with its shard and the total size.
  const std::string index = ReadAll(Path(kSafetensorsIndexFile));
  EXPECT_THAT(index, HasSubstr(absl::StrCat("\"total_size\": ", total)));
  EXPECT_THAT(index, HasSubstr(absl::StrCat("\"model.layers.0.q.weight\": \"",
                                            (*files)[q->shard], "\"")));
}

TEST_F(SafetensorsTest, SingleFile) {
  SafetensorsWriterOptions options;
  options.single_file = true;
  options.max_shard_bytes = 1;  // ignored
  auto w = SafetensorsWriter::Create(dir_, options);
  ASSERT_TRUE(w.ok());
  std::vector<uint8_t> a = RandomBytes(64, 1), b = RandomBytes(32, 2);
  ASSERT_TRUE((*w)->Add("a", DType::kF32, {4, 4}, a).ok());
  ASSERT_TRUE((*w)->Add("b", DType::kBF16, {16}, b).ok());
  auto files = (*w)->Finish();
  ASSERT_TRUE(files.ok()) << files.status();
  EXPECT_EQ(*files, std::vector<std::string>{kSafetensorsSingleFile});
  EXPECT_FALSE(std::filesystem::exists(Path(kSafetensorsIndexFile)));
  auto ck = SafetensorsCheckpoint::Open(dir_);
  ASSERT_TRUE(ck.ok()) << ck.status();
  EXPECT_EQ((*ck)->source(), Path(kSafetensorsSingleFile));
  ASSERT_EQ((*ck)->tensors().size(), 2u);
  EXPECT_EQ(std::vector<uint8_t>((*ck)->Find("b")->bytes.begin(), (*ck)->Find("b")->bytes.end()),
            b);
}

TEST_F(SafetensorsTest, ReadsAHandWrittenFile) {
  // As the Python library writes it: header padded with spaces, offsets relative
  // to the data area.
  std::string header =
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F16","shape":[2],"data_offsets":[4,8]},)"
      R"("v":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  WriteAll(Path("model.safetensors"),
           HandShard(header, std::string("\x01\x02\x03\x04\x05\x06\x07\x08", 8)));
  auto ck = SafetensorsCheckpoint::Open(dir_);
  ASSERT_TRUE(ck.ok()) << ck.status();
  const TensorInfo* w = (*ck)->Find("w");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->dtype, DType::kF16);
  EXPECT_EQ(w->NumElements(), 2);
  EXPECT_EQ(w->bytes[0], 5);
  EXPECT_EQ((*ck)->Find("v")->bytes[3], 4);
}

TEST_F(SafetensorsTest, WriterRejectsMisuse) {
  auto w = SafetensorsWriter::Create(dir_);
  ASSERT_TRUE(w.ok());
  std::vector<uint8_t> d(16);
  ASSERT_TRUE((*w)->Add("a", DType::kF32, {4}, d).ok());
  absl::Status s = (*w)->Add("a", DType::kF32, {4}, d);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("duplicate tensor a"));
  s = (*w)->Add("b", DType::kF32, {3}, d);  // 16 bytes into a 12-byte tensor
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("tensor b holds 12 bytes"));
  s = (*w)->BeginTensor("c", DType::kF32, {-1});
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);  // "b" is still open
  auto files = (*w)->Finish();
  EXPECT_EQ(files.status().code(), absl::StatusCode::kFailedPrecondition);

  auto w2 = SafetensorsWriter::Create(dir_ + "/two");
  ASSERT_TRUE(w2.ok());
  s = (*w2)->BeginTensor("c", DType::kF32, {-1});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("[-1]"));
  ASSERT_TRUE((*w2)->BeginTensor("d", DType::kF32, {2}).ok());
  ASSERT_TRUE((*w2)->Append({d.data(), 4}).ok());
  s = (*w2)->EndTensor();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("only 4 were appended"));
  EXPECT_EQ((*w2)->Append(d).code(), absl::StatusCode::kInvalidArgument);
}

// ---- corruptions: each has its own code and names the file and the tensor ----

class SafetensorsCorruptionTest : public SafetensorsTest {
 protected:
  // Writes model.safetensors with a given header text and data area.
  void WriteSingle(const std::string& header, const std::string& data) {
    WriteAll(Path(kSafetensorsSingleFile), HandShard(header, data));
  }
  absl::Status OpenStatus() { return SafetensorsCheckpoint::Open(dir_).status(); }
};

TEST_F(SafetensorsCorruptionTest, FileShorterThanLengthField) {
  WriteAll(Path(kSafetensorsSingleFile), std::string("\x10\x00\x00", 3));
  absl::Status s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr(Path(kSafetensorsSingleFile)));
  EXPECT_THAT(s.message(), HasSubstr("truncated"));
  EXPECT_THAT(s.message(), HasSubstr("3 bytes"));
}

TEST_F(SafetensorsCorruptionTest, HeaderLengthBeyondFile) {
  std::string f = HandShard(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", "x");
  f[1] = '\x7f';  // header length now ~32 KiB
  WriteAll(Path(kSafetensorsSingleFile), f);
  absl::Status s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr(Path(kSafetensorsSingleFile)));
  EXPECT_THAT(s.message(), HasSubstr("truncated: header length"));
}

TEST_F(SafetensorsCorruptionTest, HeaderNotJson) {
  WriteSingle(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]})", "x");  // missing }
  absl::Status s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr(Path(kSafetensorsSingleFile)));
  EXPECT_THAT(s.message(), HasSubstr("header is not valid JSON"));
}

TEST_F(SafetensorsCorruptionTest, HeaderWrongShape) {
  WriteSingle(R"([1, 2])", "");
  absl::Status s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr("header must be a JSON object, got array"));

  WriteSingle(R"({"a":{"shape":[1],"data_offsets":[0,1]}})", "x");
  s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr("tensor a: 'dtype' must be a string"));

  WriteSingle(R"({"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", "x");
  s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr("tensor a: 'shape'"));

  WriteSingle(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}})", "x");
  s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr("tensor a: 'data_offsets'"));
}

TEST_F(SafetensorsCorruptionTest, UnknownDtype) {
  WriteSingle(R"({"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", "12345678");
  absl::Status s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(Path(kSafetensorsSingleFile)));
  EXPECT_THAT(s.message(), HasSubstr("tensor a"));
  EXPECT_THAT(s.message(), HasSubstr("unknown dtype \"F64\""));
}

TEST_F(SafetensorsCorruptionTest, OffsetsDoNotMatchDtypeAndShape) {
  WriteSingle(R"({"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,10]}})",
              std::string(16, 'x'));
  absl::Status s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr(Path(kSafetensorsSingleFile)));
  EXPECT_THAT(s.message(), HasSubstr("tensor w: data_offsets [0, 10) hold 10 bytes, but dtype "
                                     "BF16 and shape [2, 3] need 12"));
}

TEST_F(SafetensorsCorruptionTest, OffsetsBeyondFile) {
  const std::string header = R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})";
  WriteSingle(header, std::string(10, 'x'));
  absl::Status s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  const uint64_t start = 8 + header.size();
  EXPECT_THAT(s.message(), HasSubstr(absl::StrCat(
                               Path(kSafetensorsSingleFile), ": truncated: tensor w needs bytes [",
                               start, ", ", start + 16, ") but shard has only ", start + 10)));
}

TEST_F(SafetensorsCorruptionTest, OverlappingTensors) {
  WriteSingle(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
              R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
              std::string(12, 'x'));
  absl::Status s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr(Path(kSafetensorsSingleFile)));
  EXPECT_THAT(s.message(), HasSubstr("tensors a [0, 8) and b [4, 12) overlap"));
}

TEST_F(SafetensorsCorruptionTest, NoCheckpointAtAll) {
  absl::Status s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr(dir_));
  EXPECT_THAT(s.message(), HasSubstr(kSafetensorsIndexFile));
}

TEST_F(SafetensorsCorruptionTest, IndexProblems) {
  WriteAll(Path("model-00001-of-00002.safetensors"),
           HandShard(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", "abcd"));
  // A shard the index names is missing.
  WriteAll(Path(kSafetensorsIndexFile),
           R"({"metadata":{"total_size":8},"weight_map":{"a":"model-00001-of-00002.safetensors",)"
           R"("b":"model-00002-of-00002.safetensors"}})");
  absl::Status s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr(Path(kSafetensorsIndexFile)));
  EXPECT_THAT(s.message(), HasSubstr("shard model-00002-of-00002.safetensors"));
  EXPECT_THAT(s.message(), HasSubstr("tensor b"));

  // A tensor the index lists is not in its shard.
  WriteAll(Path(kSafetensorsIndexFile),
           R"({"weight_map":{"a":"model-00001-of-00002.safetensors",)"
           R"("c":"model-00001-of-00002.safetensors"}})");
  s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("tensor c is mapped to shard "
                                     "model-00001-of-00002.safetensors, which does not contain it"));

  // Not JSON / wrong shape / path escapes.
  WriteAll(Path(kSafetensorsIndexFile), "{\"weight_map\": ");
  s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr("not valid JSON"));
  WriteAll(Path(kSafetensorsIndexFile), R"({"weight_map": [1]})");
  s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr("\"weight_map\""));
  WriteAll(Path(kSafetensorsIndexFile), R"({"weight_map": {"a": "../x.safetensors"}})");
  s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr("not a plain file name"));

  // Correct index: fine, and the index is authoritative.
  WriteAll(Path(kSafetensorsIndexFile),
           R"({"weight_map":{"a":"model-00001-of-00002.safetensors"}})");
  auto ck = SafetensorsCheckpoint::Open(dir_);
  ASSERT_TRUE(ck.ok()) << ck.status();
  EXPECT_EQ((*ck)->tensors().size(), 1u);
}

TEST_F(SafetensorsCorruptionTest, TruncatedWrittenShard) {
  SafetensorsWriterOptions options;
  options.max_shard_bytes = 64;
  auto w = SafetensorsWriter::Create(dir_, options);
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE((*w)->Add("first", DType::kF32, {16}, RandomBytes(64, 1)).ok());
  ASSERT_TRUE((*w)->Add("second", DType::kF32, {8}, RandomBytes(32, 2)).ok());
  ASSERT_TRUE((*w)->Add("third", DType::kF32, {8}, RandomBytes(32, 3)).ok());
  auto files = (*w)->Finish();
  ASSERT_TRUE(files.ok());
  ASSERT_EQ(files->size(), 2u);
  const std::string shard = Path((*files)[1]);
  std::filesystem::resize_file(shard, std::filesystem::file_size(shard) - 5);
  absl::Status s = OpenStatus();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr(shard));
  EXPECT_THAT(s.message(), HasSubstr("truncated: tensor third needs bytes"));
}

// ---- fingerprint ----

// Flips one byte of a tensor in the file on disk.
void FlipByte(const std::string& dir, const std::string& tensor, size_t offset) {
  auto ck = SafetensorsCheckpoint::Open(dir);
  ASSERT_TRUE(ck.ok());
  const TensorInfo* t = (*ck)->Find(tensor);
  ASSERT_NE(t, nullptr);
  ASSERT_LT(offset, t->bytes.size());
  const size_t pos = size_t(t->bytes.data() - (*ck)->shard_bytes(t->shard).data()) + offset;
  std::fstream f((*ck)->shard_path(t->shard), std::ios::binary | std::ios::in | std::ios::out);
  f.seekg(std::streamoff(pos));
  char c;
  f.get(c);
  f.seekp(std::streamoff(pos));
  f.put(char(c ^ 0x5a));
  ASSERT_TRUE(f.good());
}

std::string FingerprintOf(const std::string& dir, absl::string_view salt, uint64_t limit) {
  auto ck = SafetensorsCheckpoint::Open(dir);
  EXPECT_TRUE(ck.ok()) << ck.status();
  return ck.ok() ? (*ck)->Fingerprint(salt, limit) : "";
}

TEST_F(SafetensorsTest, FingerprintFullAndSampled) {
  constexpr size_t kMiB = size_t{1} << 20, kWin = size_t{64} << 10;
  const size_t big = 8 * kMiB;
  {
    auto w = SafetensorsWriter::Create(dir_);
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->Add("big", DType::kU8, {int64_t(big)}, RandomBytes(big, 7)).ok());
    ASSERT_TRUE((*w)->Add("small", DType::kF32, {4}, RandomBytes(16, 8)).ok());
    ASSERT_TRUE((*w)->Finish().ok());
  }
  const uint64_t kFull = ~uint64_t{0}, kSampled = 0;
  const std::string full0 = FingerprintOf(dir_, "cfg", kFull);
  const std::string sampled0 = FingerprintOf(dir_, "cfg", kSampled);
  EXPECT_EQ(full0.size(), 32u);
  EXPECT_EQ(full0.find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_NE(full0, sampled0);
  EXPECT_EQ(FingerprintOf(dir_, "cfg", kFull), full0);  // stable
  EXPECT_NE(FingerprintOf(dir_, "cfg2", kFull), full0);  // the salt counts

  // A byte in the gap between window 0 [1 MiB, 1 MiB + 64 KiB) and window 1
  // (1 MiB + (8 MiB - 2 MiB - 64 KiB) / 63): only the full hash sees it.
  const size_t gap = kMiB + kWin + 1000;
  ASSERT_LT(gap, kMiB + (big - 2 * kMiB - kWin) / 63);
  FlipByte(dir_, "big", gap);
  const std::string full1 = FingerprintOf(dir_, "cfg", kFull);
  EXPECT_NE(full1, full0);
  EXPECT_EQ(FingerprintOf(dir_, "cfg", kSampled), sampled0);
  // Sampled bytes: first MiB, a window, the last MiB; small tensors entirely.
  std::string prev = sampled0;
  for (auto [tensor, offset] : std::vector<std::pair<std::string, size_t>>{
           {"big", 17},
           {"big", kMiB + 5},                                    // window 0
           {"big", kMiB + 32 * ((big - 2 * kMiB - kWin) / 63) + 100},  // window 32
           {"big", big - 3 * kWin},                              // last MiB
           {"small", 15}}) {
    FlipByte(dir_, tensor, offset);
    std::string now = FingerprintOf(dir_, "cfg", kSampled);
    EXPECT_NE(now, prev) << tensor << " " << offset;
    prev = now;
  }
}

}  // namespace
}  // namespace pd::model
