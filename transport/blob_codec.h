// Internal: the length-prefixed fields of backend blobs (the opaque
// sender_info / receiver_info that backends exchange on the control channel;
// docs/kv-format.md has each backend's layout). Little-endian hosts.
#ifndef PD_TRANSPORT_BLOB_CODEC_H_
#define PD_TRANSPORT_BLOB_CODEC_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "absl/strings/string_view.h"

namespace pd::transport::blob {

inline void PutU64(std::string& s, uint64_t v) { s.append(reinterpret_cast<const char*>(&v), 8); }
inline void PutBytes(std::string& s, const void* p, size_t n) {
  PutU64(s, n);
  s.append(static_cast<const char*>(p), n);
}
// Each Get consumes its field from the front of `s`; false when `s` is too short.
inline bool GetU64(absl::string_view& s, uint64_t* v) {
  if (s.size() < 8) return false;
  std::memcpy(v, s.data(), 8);
  s.remove_prefix(8);
  return true;
}
inline bool GetBytes(absl::string_view& s, std::string* out) {
  uint64_t n = 0;
  if (!GetU64(s, &n) || n > s.size()) return false;
  out->assign(s.data(), n);
  s.remove_prefix(n);
  return true;
}

}  // namespace pd::transport::blob

#endif  // PD_TRANSPORT_BLOB_CODEC_H_
