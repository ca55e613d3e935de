// Read-only memory-mapped file, the owner of one mmap() region.
#ifndef PD_COMMON_MAPPED_FILE_H_
#define PD_COMMON_MAPPED_FILE_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "absl/status/statusor.h"

namespace pd {

// Maps a whole file read-only. Move-only; unmaps on destruction. Thread-safe for
// concurrent reads of bytes().
class MappedFile {
 public:
  // Errors: NotFound if the file does not exist, PermissionDenied/Internal for
  // other open/stat/mmap failures (message names the path and errno text).
  static absl::StatusOr<MappedFile> Open(const std::string& path);

  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  void Reset();

  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// Reads a whole (small) file into a string.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);
// Writes `contents` to `path` atomically (temp file + rename).
absl::Status WriteStringToFile(const std::string& path, absl::string_view contents);

}  // namespace pd

#endif  // PD_COMMON_MAPPED_FILE_H_
