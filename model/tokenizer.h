// Hugging Face `tokenizer.json` tokenizer: byte-level BPE as DeepSeek-V3/V3.2
// ship it, plus a streaming detokenizer for the servers.
//
// What is supported (anything else is rejected at load with InvalidArgument
// naming the field):
//   normalizer:    null, or {"type":"Sequence","normalizers":[]} (a no-op).
//   pre_tokenizer: null; "Sequence" of the below; "Split" with pattern
//                  {"Regex": ...} (Oniguruma syntax, compiled with PCRE2 in UTF +
//                  UCP mode) or {"String": ...}, behaviors Isolated, Removed,
//                  MergedWithPrevious, MergedWithNext, Contiguous, and invert;
//                  "ByteLevel" with use_regex (GPT-2's pattern) and add_prefix_space.
//   model:         "BPE" with vocab, merges ("a b" strings or ["a","b"] pairs),
//                  unk_token, fuse_unk, byte_fallback, ignore_merges; dropout must be
//                  null/0 and continuing_subword_prefix / end_of_word_suffix null/"".
//   decoder:       "ByteLevel" only (GPT-2 bytes_to_unicode inverse; a token holding
//                  a character outside that table decodes to its own UTF-8 bytes, as
//                  in HF).
//   added_tokens:  content, id, special, lstrip, rstrip, single_word, normalized.
//   post_processor and truncation/padding are ignored: Encode never adds BOS/EOS.
#ifndef PD_MODEL_TOKENIZER_H_
#define PD_MODEL_TOKENIZER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pd::model {

// One entry of tokenizer.json's "added_tokens".
struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false;      // skipped by Decode(..., skip_special = true)
  bool lstrip = false;       // the match swallows whitespace on its left
  bool rstrip = false;       // ... and on its right
  bool single_word = false;  // matches only between non-word characters
  bool normalized = false;   // matched after normalisation (a second pass)
};

// Contents DeepSeek uses for its BOS / EOS tokens.
inline constexpr char kDeepSeekBos[] = "<｜begin▁of▁sentence｜>";
inline constexpr char kDeepSeekEos[] = "<｜end▁of▁sentence｜>";

// An immutable tokenizer. Thread-safe: Encode/Decode may run concurrently (the
// BPE word cache is internally synchronised).
class Tokenizer {
 public:
  // Loads a tokenizer.json file. NotFound when the file is missing; otherwise
  // InvalidArgument naming the path and the offending field ("model.type",
  // "pre_tokenizer.pretokenizers[2].pattern.Regex", ...).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path);
  // The same from the JSON text.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(absl::string_view json);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Token ids of `text` (valid UTF-8). No BOS is added: callers add it. Added
  // tokens are split out first (leftmost-longest), the rest is pre-tokenized and
  // BPE-encoded. InvalidArgument when `text` is not valid UTF-8 (names the byte
  // offset) or holds a character the vocabulary cannot represent (no unk_token
  // and no byte_fallback).
  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text) const;

  // Text of `ids`: the tokens' bytes concatenated (special tokens left out when
  // `skip_special`), then UTF-8 repaired like Rust's String::from_utf8_lossy
  // (each maximal invalid subsequence becomes one U+FFFD), which is what HF's
  // ByteLevel decoder returns. InvalidArgument for an id outside the vocabulary.
  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids, bool skip_special) const;

  // The pre-tokenizer's pieces of `text`, as UTF-8 substrings of the input (before
  // the ByteLevel byte-to-character mapping; a ByteLevel add_prefix_space shows
  // as a leading ' '). Added tokens are not split out here. For tests and tools.
  absl::StatusOr<std::vector<std::string>> PreTokenize(absl::string_view text) const;

  // Highest id in the vocabulary or the added tokens, plus one.
  int64_t vocab_size() const;
  // The id of a vocabulary token or an added token's content (e.g. kDeepSeekBos).
  std::optional<int32_t> TokenToId(absl::string_view token) const;
  // The token string of `id` as stored in tokenizer.json (byte-level characters for
  // vocabulary tokens); nullopt for an unused id.
  std::optional<std::string> IdToToken(int32_t id) const;
  // The bytes `id` decodes to; nullopt for an unused id.
  std::optional<absl::string_view> TokenBytes(int32_t id) const;
  bool IsSpecial(int32_t id) const;
  // TokenToId(kDeepSeekBos) / TokenToId(kDeepSeekEos).
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  const std::vector<AddedToken>& added_tokens() const;

  struct Impl;  // implementation detail (tokenizer.cc)

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Turns a stream of token ids into text, one id at a time, never emitting part
// of a UTF-8 character: bytes that may still become a valid character are held
// back until the next id completes (or breaks) them. The concatenation of every
// Add() result and Finish() equals tokenizer.Decode(all ids, skip_special).
// Not thread-safe; the tokenizer must outlive it.
class StreamingDetokenizer {
 public:
  StreamingDetokenizer(const Tokenizer& tokenizer, bool skip_special);

  // The text newly completed by `id` (often empty, or several characters).
  // InvalidArgument for an id outside the vocabulary (the state is unchanged).
  absl::StatusOr<std::string> Add(int32_t id);
  // Ends the stream: held-back bytes come out as U+FFFD (as Decode does at the end
  // of its input). The detokenizer is then empty and may be reused.
  std::string Finish();
  // Bytes held back (0..3).
  size_t pending_bytes() const { return pending_.size(); }

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_;
  std::string pending_;
};

// Appends the UTF-8 repair of `bytes` to `out`, like Rust's from_utf8_lossy. With
// `final` false, a trailing incomplete but so-far-valid sequence is not converted:
// its length is returned (0..3) and the caller keeps those bytes. Returns 0 when
// `final`.
size_t AppendUtf8Lossy(absl::string_view bytes, bool final, std::string* out);

// GPT-2's bytes_to_unicode: the character (as UTF-8) that byte `b` maps to.
std::string ByteToUnicode(uint8_t b);

// tokenizer.json text of the `tiny` preset: ids 0..255 are the 256 single bytes
// (their bytes_to_unicode characters, in byte order), no merges, added special
// tokens 256 kDeepSeekBos and 257 kDeepSeekEos, DeepSeek-V3's Sequence
// pre-tokenizer (three Splits + ByteLevel) and a ByteLevel decoder. vocab_size 258.
std::string ByteLevelTokenizerJson();
// Writes ByteLevelTokenizerJson() to `path` (atomically).
absl::Status WriteByteLevelTokenizer(const std::string& path);

}  // namespace pd::model

#endif  // PD_MODEL_TOKENIZER_H_
