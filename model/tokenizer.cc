// Byte-level BPE tokenizer over Hugging Face tokenizer.json. The behaviour
// follows huggingface/tokenizers (added-token extraction, pre-tokenizer split
// behaviours, BPE merge order, ByteLevel decoder, lossy UTF-8 repair) so ids
// match what `tokenizers` produces for the same file.
#include "model/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <queue>
#include <utility>

#include <boost/json.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/mapped_file.h"
#include "common/status.h"

namespace pd::model {
namespace {

// ---------------------------------------------------------------------------
// UTF-8
// ---------------------------------------------------------------------------

constexpr char kReplacementChar[] = "\xEF\xBF\xBD";  // U+FFFD

// One step of UTF-8 decoding at p[0..n), n >= 1. `valid`: a whole character of
// `len` bytes starts here. Otherwise `len` is the length of the maximal subpart
// (the bytes that form a valid prefix of some character, at least 1) and
// `truncated` says whether decoding stopped at the end of the input.
struct Utf8Step {
  int len;
  bool valid;
  bool truncated;
};

Utf8Step NextUtf8(const unsigned char* p, size_t n) {
  const unsigned c = p[0];
  if (c < 0x80) return {1, true, false};
  int need;
  unsigned lo = 0x80, hi = 0xBF;  // bounds of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    need = 1;
  } else if (c == 0xE0) {
    need = 2, lo = 0xA0;
  } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
    need = 2;
  } else if (c == 0xED) {
    need = 2, hi = 0x9F;  // no surrogates
  } else if (c == 0xF0) {
    need = 3, lo = 0x90;
  } else if (c >= 0xF1 && c <= 0xF3) {
    need = 3;
  } else if (c == 0xF4) {
    need = 3, hi = 0x8F;  // <= U+10FFFF
  } else {
    return {1, false, false};
  }
  for (int i = 1; i <= need; ++i) {
    if (size_t(i) >= n) return {i, false, true};
    const unsigned b = p[i];
    if (b < (i == 1 ? lo : 0x80u) || b > (i == 1 ? hi : 0xBFu)) return {i, false, false};
  }
  return {need + 1, true, false};
}

// Byte offset of the first invalid UTF-8 sequence, or npos.
size_t FirstInvalidUtf8(absl::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    Utf8Step st = NextUtf8(p + i, s.size() - i);
    if (!st.valid) return i;
    i += st.len;
  }
  return absl::string_view::npos;
}

// Length of the (valid) UTF-8 character whose lead byte is `c`.
int Utf8Len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

uint32_t DecodeCodePoint(absl::string_view ch) {
  const auto* p = reinterpret_cast<const unsigned char*>(ch.data());
  switch (ch.size()) {
    case 1: return p[0];
    case 2: return ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu);
    case 3: return ((p[0] & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
    default:
      return ((p[0] & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) |
             (p[3] & 0x3Fu);
  }
}

void AppendCodePoint(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(char(cp));
  } else if (cp < 0x800) {
    out->push_back(char(0xC0 | (cp >> 6)));
    out->push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(char(0xE0 | (cp >> 12)));
    out->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(char(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(char(0xF0 | (cp >> 18)));
    out->push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(char(0x80 | (cp & 0x3F)));
  }
}

// "U+00E9 (\"é\")" for error messages; control characters are not echoed.
std::string DescribeChar(absl::string_view ch) {
  uint32_t cp = DecodeCodePoint(ch);
  std::string s = absl::StrFormat("U+%04X", cp);
  if (cp >= 0x20 && cp != 0x7F) absl::StrAppend(&s, " (\"", ch, "\")");
  return s;
}

// ---------------------------------------------------------------------------
// GPT-2 bytes_to_unicode
// ---------------------------------------------------------------------------

struct ByteTable {
  std::array<std::string, 256> byte_to_char;        // UTF-8 of the mapped character
  absl::flat_hash_map<uint32_t, uint8_t> char_to_byte;  // code point -> byte

  ByteTable() {
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const uint32_t cp = printable ? uint32_t(b) : next++;
      AppendCodePoint(cp, &byte_to_char[b]);
      char_to_byte[cp] = uint8_t(b);
    }
  }
};

const ByteTable& Bytes() {
  static const ByteTable* table = new ByteTable();
  return *table;
}

// The ByteLevel decoder for one token string: every character through the
// inverse table; a token with any character outside the table decodes to its own
// UTF-8 bytes (huggingface/tokenizers' behaviour).
std::string ByteLevelDecode(absl::string_view token) {
  const ByteTable& t = Bytes();
  std::string out;
  out.reserve(token.size());
  for (size_t i = 0; i < token.size();) {
    int len = Utf8Len(uint8_t(token[i]));
    if (i + len > token.size()) return std::string(token);
    auto it = t.char_to_byte.find(DecodeCodePoint(token.substr(i, len)));
    if (it == t.char_to_byte.end()) return std::string(token);
    out.push_back(char(it->second));
    i += len;
  }
  return out;
}

// ---------------------------------------------------------------------------
// PCRE2
// ---------------------------------------------------------------------------

struct Pcre2CodeFree {
  void operator()(pcre2_code* p) const { pcre2_code_free(p); }
};
struct Pcre2CompileContextFree {
  void operator()(pcre2_compile_context* p) const { pcre2_compile_context_free(p); }
};
struct Pcre2MatchDataFree {
  void operator()(pcre2_match_data* p) const { pcre2_match_data_free(p); }
};
struct Pcre2MatchContextFree {
  void operator()(pcre2_match_context* p) const { pcre2_match_context_free(p); }
};
struct Pcre2JitStackFree {
  void operator()(pcre2_jit_stack* p) const { pcre2_jit_stack_free(p); }
};

std::string Pcre2ErrorText(int code) {
  PCRE2_UCHAR buf[256];
  int n = pcre2_get_error_message(code, buf, sizeof(buf));
  if (n < 0) return absl::StrCat("PCRE2 error ", code);
  return std::string(reinterpret_cast<const char*>(buf), size_t(n));
}

// Per-thread match state: match data holding the overall match only (capture
// groups are never needed) and a JIT stack larger than PCRE2's 32 KiB default.
struct MatchScratch {
  std::unique_ptr<pcre2_match_data, Pcre2MatchDataFree> data;
  std::unique_ptr<pcre2_match_context, Pcre2MatchContextFree> context;
  std::unique_ptr<pcre2_jit_stack, Pcre2JitStackFree> jit_stack;

  MatchScratch() {
    data.reset(pcre2_match_data_create(1, nullptr));
    context.reset(pcre2_match_context_create(nullptr));
    jit_stack.reset(pcre2_jit_stack_create(64 * 1024, 8 * 1024 * 1024, nullptr));
    CHECK(data && context) << "PCRE2 allocation failed";
    if (jit_stack) pcre2_jit_stack_assign(context.get(), nullptr, jit_stack.get());
  }
};

MatchScratch& ThreadScratch() {
  thread_local MatchScratch scratch;
  return scratch;
}

// A compiled pattern: Oniguruma-style regexes (the dialect of tokenizer.json)
// compiled by PCRE2 in UTF + UCP mode (Unicode \s \w \d and \p{..}), with \uHHHH
// and \x{H..} escapes; or a literal string. JIT-compiled when available.
// Immutable and shareable across threads.
class Regex {
 public:
  Regex() = default;

  // `field` names the JSON field in the error message.
  static absl::StatusOr<Regex> Compile(absl::string_view pattern, bool literal,
                                       absl::string_view field) {
    std::unique_ptr<pcre2_compile_context, Pcre2CompileContextFree> cctx(
        pcre2_compile_context_create(nullptr));
    if (!cctx) return absl::ResourceExhaustedError("PCRE2: out of memory");
    uint32_t options = PCRE2_UTF;
    if (literal) {
      options |= PCRE2_LITERAL;
    } else {
      options |= PCRE2_UCP | PCRE2_ALT_BSUX;
      pcre2_set_compile_extra_options(cctx.get(), PCRE2_EXTRA_ALT_BSUX);
    }
    int err = 0;
    PCRE2_SIZE err_offset = 0;
    pcre2_code* code =
        pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options,
                      &err, &err_offset, cctx.get());
    if (code == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ": regex does not compile at offset ", err_offset, ": ", Pcre2ErrorText(err),
          " (pattern \"", pattern, "\")"));
    }
    Regex re;
    re.code_.reset(code);
    int jrc = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    re.jit_ = jrc == 0;
    if (!re.jit_) VLOG(1) << field << ": PCRE2 JIT unavailable (" << Pcre2ErrorText(jrc) << ")";
    return re;
  }

  bool ok() const { return code_ != nullptr; }

  // Appends [begin, end) of every non-overlapping match in `subject` (valid
  // UTF-8), left to right, the way Oniguruma's find_iter proceeds: after an empty
  // match the search resumes one character later, and an empty match right where
  // the previous match ended is skipped.
  absl::Status FindAll(absl::string_view subject,
                       std::vector<std::pair<size_t, size_t>>* out) const {
    MatchScratch& s = ThreadScratch();
    const auto* subj = reinterpret_cast<PCRE2_SPTR>(subject.data());
    size_t offset = 0;
    size_t last_match_end = absl::string_view::npos;
    while (offset <= subject.size()) {
      int rc = pcre2_match(code_.get(), subj, subject.size(), offset, PCRE2_NO_UTF_CHECK,
                           s.data.get(), s.context.get());
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        return absl::InternalError(
            absl::StrCat("regex match failed: ", Pcre2ErrorText(rc)));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(s.data.get());
      size_t begin = ov[0], end = ov[1];
      if (end < begin) return absl::InvalidArgumentError("regex uses \\K to end before it starts");
      if (begin == end) {
        if (end != last_match_end) out->emplace_back(begin, end);
        if (end >= subject.size()) break;
        offset = end + Utf8Len(uint8_t(subject[end]));
      } else {
        out->emplace_back(begin, end);
        offset = end;
      }
      last_match_end = end;
    }
    return absl::OkStatus();
  }

  // True when the whole of `s` matches (anchored at both ends).
  bool FullMatch(absl::string_view s) const {
    MatchScratch& sc = ThreadScratch();
    int rc = pcre2_match(code_.get(), reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), 0,
                         PCRE2_NO_UTF_CHECK | PCRE2_ANCHORED | PCRE2_ENDANCHORED,
                         sc.data.get(), sc.context.get());
    return rc >= 0;
  }

 private:
  std::unique_ptr<pcre2_code, Pcre2CodeFree> code_;
  bool jit_ = false;
};

// GPT-2's pre-tokenization pattern (ByteLevel with use_regex).
constexpr char kGpt2Pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// DeepSeek-V3's three Split patterns (as strings after JSON decoding).
constexpr const char* kDeepSeekPatterns[3] = {
    "\\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
};

// ---------------------------------------------------------------------------
// Pre-tokenizers
// ---------------------------------------------------------------------------

enum class SplitBehavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizerStep {
  enum class Kind { kSplit, kByteLevel } kind = Kind::kSplit;
  Regex regex;  // Split's pattern; ByteLevel's GPT-2 pattern when use_regex
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel
  bool use_regex = false;         // ByteLevel
};

struct Segment {
  size_t begin, end;
  bool is_match;
};

// huggingface/tokenizers NormalizedString::split: the matches and the gaps
// between them, combined by `behavior`; empty pieces are dropped.
absl::Status SplitPiece(const PreTokenizerStep& step, const std::string& piece,
                        std::vector<std::string>* out) {
  if (piece.empty()) return absl::OkStatus();
  std::vector<std::pair<size_t, size_t>> matches;
  PD_RETURN_IF_ERROR(step.regex.FindAll(piece, &matches));
  std::vector<Segment> segs;
  size_t prev = 0;
  for (auto [b, e] : matches) {
    if (prev != b) segs.push_back({prev, b, false});
    segs.push_back({b, e, true});
    prev = e;
  }
  if (prev != piece.size()) segs.push_back({prev, piece.size(), false});
  if (step.invert) {
    for (Segment& s : segs) s.is_match = !s.is_match;
  }

  // Each result: [begin, end) and whether it is removed.
  std::vector<Segment> res;
  switch (step.behavior) {
    case SplitBehavior::kIsolated:
      for (const Segment& s : segs) res.push_back({s.begin, s.end, false});
      break;
    case SplitBehavior::kRemoved:
      res = segs;  // is_match == removed
      break;
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const Segment& s : segs) {
        if (s.is_match && !previous_match && !res.empty()) {
          res.back().end = s.end;
        } else {
          res.push_back({s.begin, s.end, false});
        }
        previous_match = s.is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous_match = false;  // of the segment to the right
      for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
        if (it->is_match && !previous_match && !res.empty()) {
          res.back().begin = it->begin;
        } else {
          res.push_back({it->begin, it->end, false});
        }
        previous_match = it->is_match;
      }
      std::reverse(res.begin(), res.end());
      break;
    }
    case SplitBehavior::kContiguous: {
      int previous = -1;
      for (const Segment& s : segs) {
        if (previous == int(s.is_match) && !res.empty()) {
          res.back().end = s.end;
        } else {
          res.push_back({s.begin, s.end, false});
        }
        previous = int(s.is_match);
      }
      break;
    }
  }
  for (const Segment& s : res) {
    if (!s.is_match && s.end > s.begin) out->push_back(piece.substr(s.begin, s.end - s.begin));
  }
  return absl::OkStatus();
}

absl::StatusOr<SplitBehavior> ParseBehavior(absl::string_view s) {
  if (s == "Isolated") return SplitBehavior::kIsolated;
  if (s == "Removed") return SplitBehavior::kRemoved;
  if (s == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (s == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (s == "Contiguous") return SplitBehavior::kContiguous;
  return absl::InvalidArgumentError(absl::StrCat("unknown behavior \"", s, "\""));
}

// ---------------------------------------------------------------------------
// Added-token matching (leftmost-longest, like aho-corasick's LeftmostLongest)
// ---------------------------------------------------------------------------

class AddedMatcher {
 public:
  void Add(absl::string_view content, int index) {
    int node = 0;
    for (unsigned char c : content) {
      uint64_t key = (uint64_t(node) << 8) | c;
      auto it = edges_.find(key);
      if (it == edges_.end()) {
        terminal_.push_back(-1);
        it = edges_.emplace(key, int(terminal_.size()) - 1).first;
      }
      node = it->second;
    }
    if (terminal_[node] < 0) terminal_[node] = index;  // first definition wins
  }
  bool empty() const { return terminal_.size() == 1; }

  // The leftmost match starting at or after `from`, longest at that position:
  // {begin, end, token index}; index -1 when there is none.
  struct Match {
    size_t begin, end;
    int index;
  };
  Match Find(absl::string_view s, size_t from) const {
    for (size_t b = from; b < s.size(); ++b) {
      int node = 0, best = -1;
      size_t best_end = 0;
      for (size_t i = b; i < s.size(); ++i) {
        auto it = edges_.find((uint64_t(node) << 8) | uint8_t(s[i]));
        if (it == edges_.end()) break;
        node = it->second;
        if (terminal_[node] >= 0) best = terminal_[node], best_end = i + 1;
      }
      if (best >= 0) return {b, best_end, best};
    }
    return {0, 0, -1};
  }

 private:
  absl::flat_hash_map<uint64_t, int> edges_;  // (node << 8 | byte) -> child
  std::vector<int> terminal_{-1};             // node -> added-token index
};

// A span of the input: plain text, or an added token's id.
struct Span {
  absl::string_view text;
  int32_t id = -1;
};

// ---------------------------------------------------------------------------
// JSON helpers
// ---------------------------------------------------------------------------

absl::Status FieldError(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", field, ": ", what));
}

const char* KindName(const boost::json::value& v) {
  switch (v.kind()) {
    case boost::json::kind::null: return "null";
    case boost::json::kind::bool_: return "a boolean";
    case boost::json::kind::int64:
    case boost::json::kind::uint64:
    case boost::json::kind::double_: return "a number";
    case boost::json::kind::string: return "a string";
    case boost::json::kind::array: return "an array";
    case boost::json::kind::object: return "an object";
  }
  return "?";
}

absl::StatusOr<const boost::json::object*> AsObject(const boost::json::value* v,
                                                    absl::string_view field) {
  if (v == nullptr) return FieldError(field, "missing");
  if (!v->is_object()) return FieldError(field, absl::StrCat("expected an object, got ", KindName(*v)));
  return &v->get_object();
}

absl::StatusOr<std::string> GetString(const boost::json::object& o, const char* key,
                                      absl::string_view parent) {
  const boost::json::value* v = o.if_contains(key);
  std::string field = absl::StrCat(parent, parent.empty() ? "" : ".", key);
  if (v == nullptr) return FieldError(field, "missing");
  if (!v->is_string()) return FieldError(field, absl::StrCat("expected a string, got ", KindName(*v)));
  return std::string(v->get_string().data(), v->get_string().size());
}

// A string field that may be absent or null (-> "").
absl::StatusOr<std::string> GetOptString(const boost::json::object& o, const char* key,
                                         absl::string_view parent) {
  const boost::json::value* v = o.if_contains(key);
  if (v == nullptr || v->is_null()) return std::string();
  if (!v->is_string()) {
    return FieldError(absl::StrCat(parent, ".", key),
                      absl::StrCat("expected a string or null, got ", KindName(*v)));
  }
  return std::string(v->get_string().data(), v->get_string().size());
}

absl::StatusOr<bool> GetBool(const boost::json::object& o, const char* key,
                             absl::string_view parent, bool def) {
  const boost::json::value* v = o.if_contains(key);
  if (v == nullptr || v->is_null()) return def;
  if (!v->is_bool()) {
    return FieldError(absl::StrCat(parent, ".", key),
                      absl::StrCat("expected a boolean, got ", KindName(*v)));
  }
  return v->get_bool();
}

absl::StatusOr<int32_t> AsId(const boost::json::value& v, absl::string_view field) {
  int64_t id;
  if (v.is_int64()) {
    id = v.get_int64();
  } else if (v.is_uint64()) {
    id = v.get_uint64() > uint64_t(INT32_MAX) ? -1 : int64_t(v.get_uint64());
  } else {
    return FieldError(field, absl::StrCat("expected an integer id, got ", KindName(v)));
  }
  if (id < 0 || id > INT32_MAX - 1) return FieldError(field, absl::StrCat("id ", id, " out of range"));
  return int32_t(id);
}

std::string JsonString(const boost::json::string& s) { return std::string(s.data(), s.size()); }

}  // namespace

// ---------------------------------------------------------------------------
// Tokenizer::Impl
// ---------------------------------------------------------------------------

struct Tokenizer::Impl {
  struct MergeValue {
    int32_t rank;
    int32_t new_id;
  };
  enum class IdKind : uint8_t { kUnused, kVocab, kAdded };

  // BPE model
  absl::flat_hash_map<std::string, int32_t> vocab;
  absl::flat_hash_map<uint64_t, MergeValue> merges;  // (left << 32 | right) -> rank, result
  int32_t unk_id = -1;
  bool fuse_unk = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
  std::array<int32_t, 256> fallback_ids{};  // "<0xXX>" ids, -1 when absent

  // pre-tokenizer
  std::vector<PreTokenizerStep> steps;
  bool byte_level_output = false;  // the pieces are byte-level mapped at the end

  // added tokens
  std::vector<AddedToken> added;
  AddedMatcher raw_matcher;         // normalized == false
  AddedMatcher normalized_matcher;  // normalized == true
  absl::flat_hash_map<std::string, int32_t> added_ids;
  Regex word_char;   // \w (single_word)
  Regex space_char;  // \s (lstrip / rstrip)

  // id tables
  std::vector<IdKind> id_kind;
  std::vector<std::string> id_token;  // as in tokenizer.json
  std::vector<std::string> id_bytes;  // decoded bytes
  std::vector<bool> id_special;

  // BPE cache: byte-level piece -> ids (pieces shorter than kMaxCachedPiece).
  static constexpr size_t kCacheCapacity = 1 << 16;
  static constexpr size_t kMaxCachedPiece = 256;
  mutable absl::Mutex cache_mu;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache ABSL_GUARDED_BY(cache_mu);

  absl::Status Parse(const boost::json::object& root);
  absl::Status ParseModel(const boost::json::object& model);
  absl::Status ParsePreTokenizer(const boost::json::value& v, absl::string_view field);
  absl::Status ParseAddedTokens(const boost::json::value* v);
  absl::Status BuildIdTables();

  // Splits the text spans of `spans` on the matcher's tokens (one HF pass).
  void SplitAdded(const AddedMatcher& matcher, std::vector<Span>* spans) const;
  absl::Status PreTokenizeText(absl::string_view text, std::vector<std::string>* pieces) const;
  absl::Status EncodePiece(const std::string& piece, std::vector<int32_t>* ids) const;
  absl::Status BpePiece(const std::string& piece, std::vector<int32_t>* ids) const;

  size_t TrailingSpaceStart(absl::string_view s) const;  // start of the trailing \s* run
  size_t LeadingSpaceEnd(absl::string_view s) const;     // end of the leading \s* run
  bool EndsWithWord(absl::string_view s) const;
  bool StartsWithWord(absl::string_view s) const;
};

absl::Status Tokenizer::Impl::Parse(const boost::json::object& root) {
  // normalizer: null or an empty Sequence.
  if (const boost::json::value* n = root.if_contains("normalizer"); n != nullptr && !n->is_null()) {
    PD_ASSIGN_OR_RETURN(const boost::json::object* no, AsObject(n, "normalizer"));
    PD_ASSIGN_OR_RETURN(std::string type, GetString(*no, "type", "normalizer"));
    const boost::json::value* list = no->if_contains("normalizers");
    if (type != "Sequence" || list == nullptr || !list->is_array() || !list->get_array().empty()) {
      return FieldError("normalizer", absl::StrCat("type \"", type,
                                                   "\" is not supported (only null or an empty "
                                                   "Sequence)"));
    }
  }

  PD_ASSIGN_OR_RETURN(const boost::json::object* model, AsObject(root.if_contains("model"), "model"));
  PD_RETURN_IF_ERROR(ParseModel(*model));

  if (const boost::json::value* p = root.if_contains("pre_tokenizer"); p != nullptr && !p->is_null()) {
    PD_RETURN_IF_ERROR(ParsePreTokenizer(*p, "pre_tokenizer"));
  }

  const boost::json::value* dec = root.if_contains("decoder");
  if (dec == nullptr || dec->is_null()) {
    return FieldError("decoder", "missing (only the ByteLevel decoder is supported)");
  }
  PD_ASSIGN_OR_RETURN(const boost::json::object* dobj, AsObject(dec, "decoder"));
  PD_ASSIGN_OR_RETURN(std::string dtype, GetString(*dobj, "type", "decoder"));
  if (dtype != "ByteLevel") {
    return FieldError("decoder.type",
                      absl::StrCat("\"", dtype, "\" is not supported (only ByteLevel)"));
  }

  PD_RETURN_IF_ERROR(ParseAddedTokens(root.if_contains("added_tokens")));
  PD_ASSIGN_OR_RETURN(word_char, Regex::Compile("\\w", false, "internal"));
  PD_ASSIGN_OR_RETURN(space_char, Regex::Compile("\\s", false, "internal"));
  return BuildIdTables();
}

absl::Status Tokenizer::Impl::ParseModel(const boost::json::object& m) {
  if (const boost::json::value* t = m.if_contains("type"); t != nullptr) {
    if (!t->is_string()) return FieldError("model.type", "expected a string");
    if (t->get_string() != "BPE") {
      return FieldError("model.type", absl::StrCat("\"", JsonString(t->get_string()),
                                                   "\" is not supported (only BPE)"));
    }
  } else if (m.if_contains("merges") == nullptr) {
    return FieldError("model.type", "missing");
  }
  if (const boost::json::value* d = m.if_contains("dropout"); d != nullptr && !d->is_null()) {
    const bool zero = (d->is_double() && d->get_double() == 0.0) ||
                      (d->is_int64() && d->get_int64() == 0) ||
                      (d->is_uint64() && d->get_uint64() == 0);
    if (!zero) {
      return FieldError("model.dropout", "BPE dropout is not supported (must be null)");
    }
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    PD_ASSIGN_OR_RETURN(std::string s, GetOptString(m, key, "model"));
    if (!s.empty()) return FieldError(absl::StrCat("model.", key), "is not supported (must be null)");
  }
  PD_ASSIGN_OR_RETURN(fuse_unk, GetBool(m, "fuse_unk", "model", false));
  PD_ASSIGN_OR_RETURN(byte_fallback, GetBool(m, "byte_fallback", "model", false));
  PD_ASSIGN_OR_RETURN(ignore_merges, GetBool(m, "ignore_merges", "model", false));

  PD_ASSIGN_OR_RETURN(const boost::json::object* vo, AsObject(m.if_contains("vocab"), "model.vocab"));
  vocab.reserve(vo->size());
  for (const auto& kv : *vo) {
    std::string token(kv.key().data(), kv.key().size());
    PD_ASSIGN_OR_RETURN(int32_t id, AsId(kv.value(), absl::StrCat("model.vocab[\"", token, "\"]")));
    vocab[token] = id;
  }

  PD_ASSIGN_OR_RETURN(std::string unk, GetOptString(m, "unk_token", "model"));
  if (!unk.empty()) {
    auto it = vocab.find(unk);
    if (it == vocab.end()) {
      return FieldError("model.unk_token", absl::StrCat("\"", unk, "\" is not in model.vocab"));
    }
    unk_id = it->second;
  }
  for (int b = 0; b < 256; ++b) {
    auto it = vocab.find(absl::StrFormat("<0x%02X>", b));
    fallback_ids[b] = it == vocab.end() ? -1 : it->second;
  }

  const boost::json::value* mv = m.if_contains("merges");
  if (mv == nullptr || mv->is_null()) return absl::OkStatus();
  if (!mv->is_array()) return FieldError("model.merges", "expected an array");
  const boost::json::array& arr = mv->get_array();
  merges.reserve(arr.size());
  std::string left, right;
  for (size_t i = 0; i < arr.size(); ++i) {
    const boost::json::value& e = arr[i];
    std::string field = absl::StrCat("model.merges[", i, "]");
    if (e.is_string()) {
      absl::string_view s(e.get_string().data(), e.get_string().size());
      size_t sp = s.find(' ');
      if (sp == absl::string_view::npos || s.find(' ', sp + 1) != absl::string_view::npos) {
        return FieldError(field, absl::StrCat("\"", s, "\" is not two tokens separated by one space"));
      }
      left = std::string(s.substr(0, sp));
      right = std::string(s.substr(sp + 1));
    } else if (e.is_array() && e.get_array().size() == 2 && e.get_array()[0].is_string() &&
               e.get_array()[1].is_string()) {
      left = JsonString(e.get_array()[0].get_string());
      right = JsonString(e.get_array()[1].get_string());
    } else {
      return FieldError(field, "expected \"a b\" or [\"a\", \"b\"]");
    }
    auto l = vocab.find(left), r = vocab.find(right), n = vocab.find(left + right);
    for (auto [it, tok] : {std::pair{l, &left}, std::pair{r, &right}}) {
      if (it == vocab.end()) return FieldError(field, absl::StrCat("token \"", *tok, "\" is not in model.vocab"));
    }
    if (n == vocab.end()) {
      return FieldError(field, absl::StrCat("merged token \"", left, right, "\" is not in model.vocab"));
    }
    uint64_t key = (uint64_t(uint32_t(l->second)) << 32) | uint32_t(r->second);
    merges.try_emplace(key, MergeValue{int32_t(i), n->second});  // the first (lowest) rank wins
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::ParsePreTokenizer(const boost::json::value& v,
                                                absl::string_view field) {
  PD_ASSIGN_OR_RETURN(const boost::json::object* o, AsObject(&v, field));
  PD_ASSIGN_OR_RETURN(std::string type, GetString(*o, "type", field));
  if (type == "Sequence") {
    const boost::json::value* list = o->if_contains("pretokenizers");
    std::string lf = absl::StrCat(field, ".pretokenizers");
    if (list == nullptr || !list->is_array()) return FieldError(lf, "expected an array");
    for (size_t i = 0; i < list->get_array().size(); ++i) {
      PD_RETURN_IF_ERROR(ParsePreTokenizer(list->get_array()[i], absl::StrCat(lf, "[", i, "]")));
    }
    return absl::OkStatus();
  }
  PreTokenizerStep step;
  if (type == "Split") {
    step.kind = PreTokenizerStep::Kind::kSplit;
    std::string pf = absl::StrCat(field, ".pattern");
    PD_ASSIGN_OR_RETURN(const boost::json::object* po, AsObject(o->if_contains("pattern"), pf));
    if (const boost::json::value* re = po->if_contains("Regex"); re != nullptr) {
      if (!re->is_string()) return FieldError(absl::StrCat(pf, ".Regex"), "expected a string");
      PD_ASSIGN_OR_RETURN(step.regex, Regex::Compile(JsonString(re->get_string()), false,
                                                     absl::StrCat("tokenizer.json: ", pf, ".Regex")));
    } else if (const boost::json::value* lit = po->if_contains("String"); lit != nullptr) {
      if (!lit->is_string()) return FieldError(absl::StrCat(pf, ".String"), "expected a string");
      PD_ASSIGN_OR_RETURN(step.regex, Regex::Compile(JsonString(lit->get_string()), true,
                                                     absl::StrCat("tokenizer.json: ", pf, ".String")));
    } else {
      return FieldError(pf, "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    PD_ASSIGN_OR_RETURN(std::string behavior, GetString(*o, "behavior", field));
    auto b = ParseBehavior(behavior);
    if (!b.ok()) return FieldError(absl::StrCat(field, ".behavior"), b.status().message());
    step.behavior = *b;
    PD_ASSIGN_OR_RETURN(step.invert, GetBool(*o, "invert", field, false));
    if (byte_level_output) {
      // A Split after ByteLevel would see mapped characters; keep it simple.
      return FieldError(field, "a Split after a ByteLevel pre-tokenizer is not supported");
    }
  } else if (type == "ByteLevel") {
    step.kind = PreTokenizerStep::Kind::kByteLevel;
    PD_ASSIGN_OR_RETURN(step.add_prefix_space, GetBool(*o, "add_prefix_space", field, true));
    PD_ASSIGN_OR_RETURN(step.use_regex, GetBool(*o, "use_regex", field, true));
    if (step.use_regex) {
      PD_ASSIGN_OR_RETURN(step.regex, Regex::Compile(kGpt2Pattern, false, "ByteLevel regex"));
    }
    if (byte_level_output) return FieldError(field, "a second ByteLevel pre-tokenizer is not supported");
    byte_level_output = true;
  } else {
    return FieldError(absl::StrCat(field, ".type"),
                      absl::StrCat("\"", type,
                                   "\" is not supported (Sequence, Split, ByteLevel or null)"));
  }
  steps.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::ParseAddedTokens(const boost::json::value* v) {
  if (v == nullptr || v->is_null()) return absl::OkStatus();
  if (!v->is_array()) return FieldError("added_tokens", "expected an array");
  const boost::json::array& arr = v->get_array();
  for (size_t i = 0; i < arr.size(); ++i) {
    std::string field = absl::StrCat("added_tokens[", i, "]");
    PD_ASSIGN_OR_RETURN(const boost::json::object* o, AsObject(&arr[i], field));
    AddedToken t;
    const boost::json::value* idv = o->if_contains("id");
    if (idv == nullptr) return FieldError(absl::StrCat(field, ".id"), "missing");
    PD_ASSIGN_OR_RETURN(t.id, AsId(*idv, absl::StrCat(field, ".id")));
    PD_ASSIGN_OR_RETURN(t.content, GetString(*o, "content", field));
    if (t.content.empty()) return FieldError(absl::StrCat(field, ".content"), "is empty");
    if (FirstInvalidUtf8(t.content) != absl::string_view::npos) {
      return FieldError(absl::StrCat(field, ".content"), "is not valid UTF-8");
    }
    PD_ASSIGN_OR_RETURN(t.special, GetBool(*o, "special", field, false));
    PD_ASSIGN_OR_RETURN(t.lstrip, GetBool(*o, "lstrip", field, false));
    PD_ASSIGN_OR_RETURN(t.rstrip, GetBool(*o, "rstrip", field, false));
    PD_ASSIGN_OR_RETURN(t.single_word, GetBool(*o, "single_word", field, false));
    PD_ASSIGN_OR_RETURN(t.normalized, GetBool(*o, "normalized", field, !t.special));
    if (auto it = added_ids.find(t.content); it != added_ids.end() && it->second != t.id) {
      return FieldError(field, absl::StrCat("content \"", t.content, "\" is listed with ids ",
                                            it->second, " and ", t.id));
    }
    added_ids[t.content] = t.id;
    int index = int(added.size());
    (t.normalized ? normalized_matcher : raw_matcher).Add(t.content, index);
    added.push_back(std::move(t));
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::BuildIdTables() {
  int64_t size = 0;
  for (const auto& [tok, id] : vocab) size = std::max<int64_t>(size, int64_t(id) + 1);
  for (const AddedToken& t : added) size = std::max<int64_t>(size, int64_t(t.id) + 1);
  id_kind.assign(size, IdKind::kUnused);
  id_token.assign(size, std::string());
  id_special.assign(size, false);
  for (const auto& [tok, id] : vocab) {
    if (id_kind[id] != IdKind::kUnused) {
      return FieldError("model.vocab", absl::StrCat("id ", id, " is used by both \"", id_token[id],
                                                    "\" and \"", tok, "\""));
    }
    id_kind[id] = IdKind::kVocab;
    id_token[id] = tok;
  }
  for (const AddedToken& t : added) {  // added tokens take precedence (as in HF)
    id_kind[t.id] = IdKind::kAdded;
    id_token[t.id] = t.content;
    id_special[t.id] = t.special;
  }
  id_bytes.assign(size, std::string());
  for (int64_t id = 0; id < size; ++id) {
    if (id_kind[id] != IdKind::kUnused) id_bytes[id] = ByteLevelDecode(id_token[id]);
  }
  return absl::OkStatus();
}

size_t Tokenizer::Impl::TrailingSpaceStart(absl::string_view s) const {
  size_t end = s.size();
  while (end > 0) {
    size_t b = end - 1;
    while (b > 0 && (uint8_t(s[b]) & 0xC0) == 0x80) --b;
    if (!space_char.FullMatch(s.substr(b, end - b))) break;
    end = b;
  }
  return end;
}

size_t Tokenizer::Impl::LeadingSpaceEnd(absl::string_view s) const {
  size_t i = 0;
  while (i < s.size()) {
    int len = Utf8Len(uint8_t(s[i]));
    if (!space_char.FullMatch(s.substr(i, len))) break;
    i += len;
  }
  return i;
}

bool Tokenizer::Impl::EndsWithWord(absl::string_view s) const {
  if (s.empty()) return false;
  size_t b = s.size() - 1;
  while (b > 0 && (uint8_t(s[b]) & 0xC0) == 0x80) --b;
  return word_char.FullMatch(s.substr(b));
}

bool Tokenizer::Impl::StartsWithWord(absl::string_view s) const {
  if (s.empty()) return false;
  return word_char.FullMatch(s.substr(0, Utf8Len(uint8_t(s[0]))));
}

// huggingface/tokenizers AddedVocabulary::find_matches over each text span.
void Tokenizer::Impl::SplitAdded(const AddedMatcher& matcher, std::vector<Span>* spans) const {
  if (matcher.empty()) return;
  std::vector<Span> out;
  for (const Span& span : *spans) {
    if (span.id >= 0) {
      out.push_back(span);
      continue;
    }
    absl::string_view s = span.text;
    size_t start_offset = 0, from = 0;
    while (true) {
      AddedMatcher::Match m = matcher.Find(s, from);
      if (m.index < 0) break;
      from = m.end;
      const AddedToken& t = added[m.index];
      size_t start = m.begin, stop = m.end;
      if (start < start_offset) continue;  // inside the previous token's rstrip
      if (t.single_word) {
        bool start_space = start == 0 || !EndsWithWord(s.substr(0, start));
        bool stop_space = stop == s.size() || !StartsWithWord(s.substr(stop));
        if (!start_space || !stop_space) continue;
      }
      if (t.lstrip) start = std::max(TrailingSpaceStart(s.substr(0, start)), start_offset);
      if (t.rstrip) stop += LeadingSpaceEnd(s.substr(stop));
      if (start_offset < start) out.push_back({s.substr(start_offset, start - start_offset), -1});
      out.push_back({s.substr(start, stop - start), t.id});
      start_offset = stop;
    }
    if (start_offset < s.size()) out.push_back({s.substr(start_offset), -1});
  }
  *spans = std::move(out);
}

absl::Status Tokenizer::Impl::PreTokenizeText(absl::string_view text,
                                              std::vector<std::string>* pieces) const {
  std::vector<std::string> cur;
  if (!text.empty()) cur.emplace_back(text);
  std::vector<std::string> next;
  for (const PreTokenizerStep& step : steps) {
    next.clear();
    for (std::string& p : cur) {
      if (step.kind == PreTokenizerStep::Kind::kSplit) {
        PD_RETURN_IF_ERROR(SplitPiece(step, p, &next));
        continue;
      }
      // ByteLevel: optional prefix space, optional GPT-2 split (the mapping to
      // characters happens when the piece is encoded).
      if (step.add_prefix_space && (p.empty() || p[0] != ' ')) p.insert(p.begin(), ' ');
      if (step.use_regex) {
        PD_RETURN_IF_ERROR(SplitPiece(step, p, &next));
      } else if (!p.empty()) {
        next.push_back(std::move(p));
      }
    }
    cur.swap(next);
  }
  for (std::string& p : cur) pieces->push_back(std::move(p));
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::EncodePiece(const std::string& piece, std::vector<int32_t>* ids) const {
  if (!byte_level_output) return BpePiece(piece, ids);
  const ByteTable& t = Bytes();
  std::string mapped;
  mapped.reserve(piece.size() * 2);
  for (unsigned char c : piece) mapped += t.byte_to_char[c];
  return BpePiece(mapped, ids);
}

// BPE over one pre-token: characters -> ids, then merges by rank (lowest first,
// leftmost among equal ranks), exactly as huggingface/tokenizers' Word::merge_all.
absl::Status Tokenizer::Impl::BpePiece(const std::string& piece, std::vector<int32_t>* ids) const {
  if (ignore_merges) {
    if (auto it = vocab.find(piece); it != vocab.end()) {
      ids->push_back(it->second);
      return absl::OkStatus();
    }
  }
  const bool cacheable = piece.size() < kMaxCachedPiece;
  if (cacheable) {
    absl::MutexLock lock(&cache_mu);
    if (auto it = cache.find(piece); it != cache.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return absl::OkStatus();
    }
  }

  struct Symbol {
    int32_t id;
    int32_t prev, next;  // -1 at the ends
    bool alive;
  };
  std::vector<Symbol> sym;
  sym.reserve(piece.size());
  auto push = [&sym](int32_t id) {
    int32_t n = int32_t(sym.size());
    sym.push_back({id, n - 1, -1, true});
    if (n > 0) sym[n - 1].next = n;
  };
  bool pending_unk = false;
  for (size_t i = 0; i < piece.size();) {
    const int len = Utf8Len(uint8_t(piece[i]));
    absl::string_view ch(piece.data() + i, std::min<size_t>(len, piece.size() - i));
    i += ch.size();
    auto it = vocab.find(ch);
    if (it != vocab.end()) {
      if (pending_unk) push(unk_id), pending_unk = false;
      push(it->second);
      continue;
    }
    if (byte_fallback) {
      bool all = true;
      for (unsigned char c : ch) all = all && fallback_ids[c] >= 0;
      if (all) {
        if (pending_unk) push(unk_id), pending_unk = false;
        for (unsigned char c : ch) push(fallback_ids[c]);
        continue;
      }
    }
    if (unk_id < 0) {
      std::string shown(ch);
      if (byte_level_output) shown = ByteLevelDecode(ch);  // the input character's bytes
      std::string desc = FirstInvalidUtf8(shown) == absl::string_view::npos && !shown.empty()
                             ? DescribeChar(shown.substr(0, Utf8Len(uint8_t(shown[0]))))
                             : absl::StrCat("byte 0x", absl::Hex(uint8_t(shown[0]), absl::kZeroPad2));
      return absl::InvalidArgumentError(absl::StrCat(
          "text cannot be encoded: ", desc,
          " is not in the vocabulary and the model has no unk_token or byte_fallback"));
    }
    if (pending_unk && !fuse_unk) push(unk_id);
    pending_unk = true;
  }
  if (pending_unk) push(unk_id);

  struct Candidate {
    int32_t rank, pos, new_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  auto lookup = [this](int32_t a, int32_t b) -> const MergeValue* {
    auto it = merges.find((uint64_t(uint32_t(a)) << 32) | uint32_t(b));
    return it == merges.end() ? nullptr : &it->second;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  for (int32_t i = 0; i + 1 < int32_t(sym.size()); ++i) {
    if (const MergeValue* m = lookup(sym[i].id, sym[i + 1].id)) queue.push({m->rank, i, m->new_id});
  }
  while (!queue.empty()) {
    Candidate top = queue.top();
    queue.pop();
    Symbol& cur = sym[top.pos];
    if (!cur.alive || cur.next < 0) continue;
    const int32_t right = cur.next;
    const MergeValue* m = lookup(cur.id, sym[right].id);
    if (m == nullptr || m->new_id != top.new_id) continue;  // stale
    cur.id = top.new_id;
    sym[right].alive = false;
    cur.next = sym[right].next;
    if (cur.next >= 0) sym[cur.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (const MergeValue* p = lookup(sym[cur.prev].id, cur.id)) {
        queue.push({p->rank, cur.prev, p->new_id});
      }
    }
    if (cur.next >= 0) {
      if (const MergeValue* n = lookup(cur.id, sym[cur.next].id)) {
        queue.push({n->rank, top.pos, n->new_id});
      }
    }
  }
  std::vector<int32_t> result;
  for (const Symbol& s : sym) {
    if (s.alive) result.push_back(s.id);
  }
  ids->insert(ids->end(), result.begin(), result.end());
  if (cacheable) {
    absl::MutexLock lock(&cache_mu);
    if (cache.size() < kCacheCapacity) cache.try_emplace(piece, std::move(result));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(absl::string_view json) {
  boost::json::parser parser;
  boost::system::error_code ec;
  // write() parses the whole text: trailing data or a truncated document is an error.
  size_t consumed = parser.write(json.data(), json.size(), ec);
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: bad JSON near byte ",
                                                   consumed, ": ", ec.message()));
  }
  boost::json::value root = parser.release();
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer.json: expected a JSON object, got ", KindName(root)));
  }
  auto impl = std::make_unique<Impl>();
  PD_RETURN_IF_ERROR(impl->Parse(root.get_object()));
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  auto text = ReadFileToString(path);
  if (!text.ok()) return Annotate(text.status(), absl::StrCat("loading tokenizer ", path));
  auto tok = FromJson(*text);
  if (!tok.ok()) return Annotate(tok.status(), path);
  return tok;
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(absl::string_view text) const {
  if (size_t bad = FirstInvalidUtf8(text); bad != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "text is not valid UTF-8 at byte ", bad, " (0x",
        absl::Hex(uint8_t(text[bad]), absl::kZeroPad2), ")"));
  }
  std::vector<Span> spans;
  if (!text.empty()) spans.push_back({text, -1});
  // As HF: tokens with normalized == false first, then (on the remaining text,
  // which no normalizer changes here) those with normalized == true.
  impl_->SplitAdded(impl_->raw_matcher, &spans);
  impl_->SplitAdded(impl_->normalized_matcher, &spans);
  std::vector<int32_t> ids;
  std::vector<std::string> pieces;
  for (const Span& span : spans) {
    if (span.id >= 0) {
      ids.push_back(span.id);
      continue;
    }
    pieces.clear();
    PD_RETURN_IF_ERROR(impl_->PreTokenizeText(span.text, &pieces));
    for (const std::string& p : pieces) PD_RETURN_IF_ERROR(impl_->EncodePiece(p, &ids));
  }
  return ids;
}

absl::StatusOr<std::string> Tokenizer::Decode(std::span<const int32_t> ids,
                                              bool skip_special) const {
  std::string bytes;
  for (size_t i = 0; i < ids.size(); ++i) {
    std::optional<absl::string_view> b = TokenBytes(ids[i]);
    if (!b) {
      return absl::InvalidArgumentError(absl::StrCat("Decode: ids[", i, "] = ", ids[i],
                                                     " is not in the vocabulary (size ",
                                                     vocab_size(), ")"));
    }
    if (skip_special && impl_->id_special[ids[i]]) continue;
    bytes.append(b->data(), b->size());
  }
  std::string out;
  AppendUtf8Lossy(bytes, /*final=*/true, &out);
  return out;
}

absl::StatusOr<std::vector<std::string>> Tokenizer::PreTokenize(absl::string_view text) const {
  if (size_t bad = FirstInvalidUtf8(text); bad != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("text is not valid UTF-8 at byte ", bad));
  }
  std::vector<std::string> pieces;
  PD_RETURN_IF_ERROR(impl_->PreTokenizeText(text, &pieces));
  return pieces;
}

int64_t Tokenizer::vocab_size() const { return int64_t(impl_->id_kind.size()); }

std::optional<int32_t> Tokenizer::TokenToId(absl::string_view token) const {
  if (auto it = impl_->added_ids.find(token); it != impl_->added_ids.end()) return it->second;
  if (auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

std::optional<std::string> Tokenizer::IdToToken(int32_t id) const {
  if (id < 0 || id >= vocab_size() || impl_->id_kind[id] == Impl::IdKind::kUnused) {
    return std::nullopt;
  }
  return impl_->id_token[id];
}

std::optional<absl::string_view> Tokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= vocab_size() || impl_->id_kind[id] == Impl::IdKind::kUnused) {
    return std::nullopt;
  }
  return absl::string_view(impl_->id_bytes[id]);
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->id_special[id];
}

std::optional<int32_t> Tokenizer::bos_id() const { return TokenToId(kDeepSeekBos); }
std::optional<int32_t> Tokenizer::eos_id() const { return TokenToId(kDeepSeekEos); }
const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }

// ---------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------

StreamingDetokenizer::StreamingDetokenizer(const Tokenizer& tokenizer, bool skip_special)
    : tokenizer_(&tokenizer), skip_special_(skip_special) {}

absl::StatusOr<std::string> StreamingDetokenizer::Add(int32_t id) {
  std::optional<absl::string_view> b = tokenizer_->TokenBytes(id);
  if (!b) {
    return absl::InvalidArgumentError(absl::StrCat("id ", id, " is not in the vocabulary (size ",
                                                   tokenizer_->vocab_size(), ")"));
  }
  std::string out;
  if (skip_special_ && tokenizer_->IsSpecial(id)) return out;
  pending_.append(b->data(), b->size());
  size_t keep = AppendUtf8Lossy(pending_, /*final=*/false, &out);
  pending_.erase(0, pending_.size() - keep);
  return out;
}

std::string StreamingDetokenizer::Finish() {
  std::string out;
  AppendUtf8Lossy(pending_, /*final=*/true, &out);
  pending_.clear();
  return out;
}

// ---------------------------------------------------------------------------
// Free functions
// ---------------------------------------------------------------------------

size_t AppendUtf8Lossy(absl::string_view bytes, bool final, std::string* out) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t i = 0, n = bytes.size();
  out->reserve(out->size() + n);
  while (i < n) {
    size_t run = i;
    while (run < n && p[run] < 0x80) ++run;  // ASCII fast path
    if (run > i) {
      out->append(bytes.data() + i, run - i);
      i = run;
      continue;
    }
    Utf8Step st = NextUtf8(p + i, n - i);
    if (st.valid) {
      out->append(bytes.data() + i, st.len);
    } else if (st.truncated && !final) {
      return n - i;
    } else {
      out->append(kReplacementChar);
    }
    i += st.len;
  }
  return 0;
}

std::string ByteToUnicode(uint8_t b) { return Bytes().byte_to_char[b]; }

std::string ByteLevelTokenizerJson() {
  boost::json::object vocab;
  for (int b = 0; b < 256; ++b) vocab[ByteToUnicode(uint8_t(b))] = b;

  boost::json::object model{{"type", "BPE"},           {"dropout", nullptr},
                            {"unk_token", nullptr},    {"continuing_subword_prefix", nullptr},
                            {"end_of_word_suffix", nullptr}, {"fuse_unk", false},
                            {"byte_fallback", false},  {"ignore_merges", false}};
  model["vocab"] = std::move(vocab);
  model["merges"] = boost::json::array();

  boost::json::array pretokenizers;
  for (const char* pattern : kDeepSeekPatterns) {
    pretokenizers.push_back(boost::json::object{{"type", "Split"},
                                                {"pattern", boost::json::object{{"Regex", pattern}}},
                                                {"behavior", "Isolated"},
                                                {"invert", false}});
  }
  pretokenizers.push_back(boost::json::object{{"type", "ByteLevel"},
                                              {"add_prefix_space", false},
                                              {"trim_offsets", true},
                                              {"use_regex", false}});

  boost::json::array added;
  int32_t id = 256;
  for (const char* content : {kDeepSeekBos, kDeepSeekEos}) {
    added.push_back(boost::json::object{{"id", id++},           {"content", content},
                                        {"single_word", false}, {"lstrip", false},
                                        {"rstrip", false},      {"normalized", false},
                                        {"special", true}});
  }

  boost::json::object root;
  root["version"] = "1.0";
  root["truncation"] = nullptr;
  root["padding"] = nullptr;
  root["added_tokens"] = std::move(added);
  root["normalizer"] = nullptr;
  root["pre_tokenizer"] =
      boost::json::object{{"type", "Sequence"}, {"pretokenizers", std::move(pretokenizers)}};
  root["post_processor"] = nullptr;
  root["decoder"] = boost::json::object{{"type", "ByteLevel"},
                                        {"add_prefix_space", true},
                                        {"trim_offsets", true},
                                        {"use_regex", true}};
  root["model"] = std::move(model);
  return boost::json::serialize(root);
}

absl::Status WriteByteLevelTokenizer(const std::string& path) {
  return WriteStringToFile(path, ByteLevelTokenizerJson());
}

}  // namespace pd::model
