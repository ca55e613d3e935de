#include "common/status.h"

#include <gtest/gtest.h>

#include "common/ids.h"
#include "common/mapped_file.h"

namespace pd {
namespace {

absl::StatusOr<int> Half(int x) {
  if (x % 2) return absl::InvalidArgumentError("odd");
  return x / 2;
}

absl::StatusOr<int> Quarter(int x) {
  PD_ASSIGN_OR_RETURN(int h, Half(x));
  PD_ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

absl::Status CheckPositive(int x) {
  PD_RETURN_IF_ERROR(x > 0 ? absl::OkStatus() : absl::OutOfRangeError("not positive"));
  return absl::OkStatus();
}

TEST(StatusTest, MacrosPropagate) {
  EXPECT_EQ(*Quarter(8), 2);
  EXPECT_EQ(Quarter(6).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(CheckPositive(1).ok());
  EXPECT_EQ(CheckPositive(0).code(), absl::StatusCode::kOutOfRange);
  auto annotated = Annotate(absl::NotFoundError("x"), "loading y");
  EXPECT_EQ(annotated.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(annotated.message(), "loading y: x");
}

TEST(IdsTest, RequestIds) {
  std::string a = NewRequestId(), b = NewRequestId();
  EXPECT_EQ(a.size(), 32u);
  EXPECT_NE(a, b);
  EXPECT_TRUE(IsValidRequestId(a));
  EXPECT_FALSE(IsValidRequestId(""));
  EXPECT_FALSE(IsValidRequestId("a b"));
  EXPECT_FALSE(IsValidRequestId(std::string(129, 'a')));
}

TEST(MappedFileTest, MapsAndReportsMissing) {
  std::string path = ::testing::TempDir() + "/mapped_file_test.bin";
  ASSERT_TRUE(WriteStringToFile(path, "hello").ok());
  auto f = MappedFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(f->data()), f->size()), "hello");
  MappedFile moved = std::move(*f);
  EXPECT_EQ(moved.size(), 5u);
  auto missing = MappedFile::Open(path + ".nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("mapped_file_test.bin.nope"), std::string::npos);
}

}  // namespace
}  // namespace pd
