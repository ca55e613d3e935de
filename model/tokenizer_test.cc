#include "model/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <atomic>
#include <set>
#include <thread>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/mapped_file.h"

namespace pd::model {
namespace {

using ::testing::HasSubstr;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

std::string JsonEscape(absl::string_view s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(c);
    } else if (uint8_t(c) < 0x20) {
      absl::StrAppend(&out, "\\u00", absl::Hex(uint8_t(c), absl::kZeroPad2));
    } else {
      out.push_back(c);
    }
  }
  return out;
}

// The 256 byte-level characters as a JSON vocab body: "<char>": byte, ...
std::string ByteVocabEntries() {
  std::string out;
  for (int b = 0; b < 256; ++b) {
    absl::StrAppend(&out, b ? ", " : "", "\"", JsonEscape(ByteToUnicode(uint8_t(b))), "\": ", b);
  }
  return out;
}

std::unique_ptr<Tokenizer> MustLoad(const std::string& json) {
  auto tok = Tokenizer::FromJson(json);
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(*tok) : nullptr;
}

std::vector<int32_t> MustEncode(const Tokenizer& tok, absl::string_view text) {
  auto ids = tok.Encode(text);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

std::string MustDecode(const Tokenizer& tok, const std::vector<int32_t>& ids, bool skip) {
  auto s = tok.Decode(ids, skip);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : std::string();
}

std::vector<int32_t> BytesAsIds(absl::string_view s) {
  std::vector<int32_t> ids;
  for (unsigned char c : s) ids.push_back(c);
  return ids;
}

bool IsValidUtf8(absl::string_view s) {
  // Independent of the tokenizer: decode and check every constraint.
  size_t i = 0;
  while (i < s.size()) {
    const unsigned c = uint8_t(s[i]);
    const int n = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
    if (n < 0 || i + n >= s.size()) return false;
    uint32_t cp = n == 0 ? c : n == 1 ? (c & 0x1F) : n == 2 ? (c & 0x0F) : (c & 0x07);
    for (int k = 1; k <= n; ++k) {
      const unsigned b = uint8_t(s[i + k]);
      if ((b & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (b & 0x3F);
    }
    static constexpr uint32_t kMin[4] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

std::string Utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s.push_back(char(cp));
  } else if (cp < 0x800) {
    s.push_back(char(0xC0 | (cp >> 6)));
    s.push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    s.push_back(char(0xE0 | (cp >> 12)));
    s.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    s.push_back(char(0x80 | (cp & 0x3F)));
  } else {
    s.push_back(char(0xF0 | (cp >> 18)));
    s.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    s.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    s.push_back(char(0x80 | (cp & 0x3F)));
  }
  return s;
}

const std::string kFffd = "\xEF\xBF\xBD";

std::string TempPath(absl::string_view name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return absl::StrCat(dir ? dir : "/tmp", "/pd_tokenizer_test_", getpid(), "_", name);
}

// ---------------------------------------------------------------------------
// The hand-written "hello world" BPE tokenizer.
//
// ids 0..255: the byte-level characters of bytes 0..255 (so 'h' = 104, 'e' = 101,
// 'l' = 108, 'o' = 111, 'w' = 119, 'r' = 114, 'd' = 100, ' ' -> "Ġ" = 32).
// Merges, in rank order (both JSON forms are used):
//   r0 "h e" -> "he" 256        r5 "o r" -> "or" 261
//   r1 "l l" -> "ll" 257        r6 "Ġw or" -> "Ġwor" 262
//   r2 "he ll" -> "hell" 258    r7 "l d" -> "ld" 263
//   r3 "hell o" -> "hello" 259  r8 "Ġwor ld" -> "Ġworld" 264
//   r4 "Ġ w" -> "Ġw" 260        r9 "e l" -> "el" 265
// Added tokens: 266 "<s>" special, 267 "</s>" special, 268 "<mask>" (lstrip +
// rstrip, not special), 269 "<sw>" (single_word), 270 "<s>!" special.
// Pre-tokenizer: DeepSeek-V3's Sequence (read back from the tiny preset's JSON).
// ---------------------------------------------------------------------------

std::string DeepSeekPreTokenizerJson() {
  // Cut the "pre_tokenizer" value out of the preset's JSON.
  std::string j = ByteLevelTokenizerJson();
  size_t b = j.find("\"pre_tokenizer\":");
  size_t e = j.find(",\"post_processor\"");
  EXPECT_NE(b, std::string::npos);
  EXPECT_NE(e, std::string::npos);
  return j.substr(b + 16, e - b - 16);
}

std::string HelloWorldJson() {
  return absl::StrCat(
      R"({"version": "1.0", "normalizer": null, "post_processor": null,
          "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true},
          "pre_tokenizer": )",
      DeepSeekPreTokenizerJson(), R"(,
          "added_tokens": [
            {"id": 266, "content": "<s>", "special": true, "lstrip": false, "rstrip": false,
             "single_word": false, "normalized": false},
            {"id": 267, "content": "</s>", "special": true},
            {"id": 268, "content": "<mask>", "special": false, "lstrip": true, "rstrip": true,
             "normalized": false},
            {"id": 269, "content": "<sw>", "special": false, "single_word": true},
            {"id": 270, "content": "<s>!", "special": true}
          ],
          "model": {"type": "BPE", "dropout": null, "unk_token": null,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": false, "byte_fallback": false,
            "vocab": {)",
      ByteVocabEntries(), R"(, "he": 256, "ll": 257, "hell": 258, "hello": 259, "Ġw": 260,
                      "or": 261, "Ġwor": 262, "ld": 263, "Ġworld": 264, "el": 265},
            "merges": ["h e", "l l", ["he", "ll"], "hell o", "Ġ w", ["o", "r"], "Ġw or",
                       "l d", "Ġwor ld", "e l"]}})");
}

class HelloWorldTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tok_ = MustLoad(HelloWorldJson());
    ASSERT_NE(tok_, nullptr);
  }
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(HelloWorldTest, VocabularyShape) {
  EXPECT_EQ(tok_->vocab_size(), 271);
  EXPECT_EQ(tok_->TokenToId("hello"), 259);
  EXPECT_EQ(tok_->TokenToId("Ġworld"), 264);
  EXPECT_EQ(tok_->TokenToId("<mask>"), 268);
  EXPECT_EQ(tok_->TokenToId("nope"), std::nullopt);
  EXPECT_EQ(tok_->IdToToken(262), "Ġwor");
  EXPECT_EQ(tok_->IdToToken(271), std::nullopt);
  EXPECT_EQ(tok_->TokenBytes(264), " world");
  EXPECT_TRUE(tok_->IsSpecial(266));
  EXPECT_FALSE(tok_->IsSpecial(268));
  EXPECT_FALSE(tok_->IsSpecial(259));
  EXPECT_EQ(tok_->added_tokens().size(), 5u);
}

TEST_F(HelloWorldTest, EncodesHelloWorld) {
  // Pieces "hello" | " world".
  // "hello" = h e l l o. Queue: (h,e)@0 r0, (e,l)@1 r9, (l,l)@2 r1.
  //   r0 -> [he] l l o; r1 -> [he] [ll] o, new pair (he,ll) r2; r2 -> [hell] o,
  //   new (hell,o) r3 -> [hello]; the stale (e,l)@1 entry is skipped.  => 259
  // " world" = Ġ w o r l d. Queue: (Ġ,w)@0 r4, (o,r)@2 r5, (l,d)@4 r7.
  //   r4 -> Ġw; r5 -> or, new (Ġw,or) r6; r6 -> Ġwor; r7 -> ld, new (Ġwor,ld) r8;
  //   r8 -> Ġworld.  => 264
  EXPECT_EQ(MustEncode(*tok_, "hello world"), (std::vector<int32_t>{259, 264}));
  EXPECT_EQ(MustDecode(*tok_, {259, 264}, false), "hello world");
}

TEST_F(HelloWorldTest, MergeOrderFollowsRankNotPosition) {
  // "elll" = e l l l: (e,l)@0 r9, (l,l)@1 r1, (l,l)@2 r1. Lowest rank first:
  // r1@1 -> e [ll] l; r1@2 is gone (its left symbol was merged away); (e,ll) and
  // (ll,l) are not merges. A left-to-right merger would have made "el" first.
  EXPECT_EQ(MustEncode(*tok_, "elll"), (std::vector<int32_t>{101, 257, 108}));
  // "hel": r0 -> [he] l; (he,l) is not a merge; (e,l)@1 is stale.
  EXPECT_EQ(MustEncode(*tok_, "hel"), (std::vector<int32_t>{256, 108}));
  // "ello": (e,l)@0 r9 loses to (l,l)@1 r1 -> e [ll] o; (e,ll) is not a merge.
  EXPECT_EQ(MustEncode(*tok_, "ello"), (std::vector<int32_t>{101, 257, 111}));
  // "elo": only (e,l) r9 applies -> [el] o.
  EXPECT_EQ(MustEncode(*tok_, "elo"), (std::vector<int32_t>{265, 111}));
}

TEST_F(HelloWorldTest, PreTokenizationThenBpe) {
  // "hello  world!" -> "hello" | " " | " world" | "!" (the first space is "\s+(?!\S)"
  // backing off one space; the second joins the word). " " = Ġ = 32, "!" = 33.
  EXPECT_EQ(MustEncode(*tok_, "hello  world!"), (std::vector<int32_t>{259, 32, 264, 33}));
  // "hello\nworld" -> "hello" | "\n" | "world": "world" has no leading Ġ so only
  // o-r merges: w [or] [ld] (r5, r7; no (w,or) merge).
  EXPECT_EQ(MustEncode(*tok_, "hello\nworld"),
            (std::vector<int32_t>{259, 10, 119, 261, 263}));
  // Repeated words hit the cache and must give the same ids. " hello" is its own
  // piece: Ġ h e l l o -> r0 he, r1 ll, r2 hell, r3 hello; (Ġ,hello) is no merge.
  EXPECT_EQ(MustEncode(*tok_, "hello world hello world"),
            (std::vector<int32_t>{259, 264, 32, 259, 264}));
}

TEST_F(HelloWorldTest, AddedTokensInsideText) {
  // Special tokens map straight to their ids; surrounding text is encoded normally.
  EXPECT_EQ(MustEncode(*tok_, "<s>hello</s>"), (std::vector<int32_t>{266, 259, 267}));
  // Leftmost-longest: "<s>!" (270) wins over "<s>" (266).
  EXPECT_EQ(MustEncode(*tok_, "<s>!hello"), (std::vector<int32_t>{270, 259}));
  // A partial token is plain text: "<s" -> '<' 's'.
  EXPECT_EQ(MustEncode(*tok_, "<s"), (std::vector<int32_t>{60, 115}));
  // lstrip + rstrip: "<mask>" swallows the spaces on both sides.
  EXPECT_EQ(MustEncode(*tok_, "hello <mask> hello"), (std::vector<int32_t>{259, 268, 259}));
  // single_word: inside a word it is not matched ("x<sw>" -> bytes), between
  // spaces it is.
  EXPECT_EQ(MustEncode(*tok_, "x<sw>"), (std::vector<int32_t>{120, 60, 115, 119, 62}));
  EXPECT_EQ(MustEncode(*tok_, "x <sw> y"), (std::vector<int32_t>{120, 32, 269, 32, 121}));

  // Decode: skip_special drops 266/267/270 but not the non-special 268.
  std::vector<int32_t> ids = {266, 259, 268, 264, 267};
  EXPECT_EQ(MustDecode(*tok_, ids, false), "<s>hello<mask> world</s>");
  EXPECT_EQ(MustDecode(*tok_, ids, true), "hello<mask> world");
}

TEST_F(HelloWorldTest, ConcurrentEncodesAgree) {
  // Encode is const and shares the BPE cache: threads must see the same ids.
  std::vector<std::string> texts;
  for (int i = 0; i < 64; ++i) {
    texts.push_back(absl::StrCat("hello world ", i, " <s>elll", std::string(i % 7, ' '), "hel"));
  }
  std::vector<std::vector<int32_t>> expected;
  {
    auto fresh = MustLoad(HelloWorldJson());  // its own cache, filled single-threaded
    ASSERT_NE(fresh, nullptr);
    for (const std::string& t : texts) expected.push_back(MustEncode(*fresh, t));
  }
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int th = 0; th < 4; ++th) {
    threads.emplace_back([&, th] {
      for (int rep = 0; rep < 50; ++rep) {
        for (size_t i = 0; i < texts.size(); ++i) {
          size_t k = (i + size_t(th) * 17 + size_t(rep)) % texts.size();
          auto ids = tok_->Encode(texts[k]);
          if (!ids.ok() || *ids != expected[k]) ++mismatches;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST_F(HelloWorldTest, DecodeRejectsUnknownIds) {
  std::vector<int32_t> ids = {259, 271};
  auto s = tok_->Decode(ids, false);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("ids[1] = 271"));
  ids = {-1};
  EXPECT_FALSE(tok_->Decode(ids, false).ok());
}

// ---------------------------------------------------------------------------
// GPT-2 byte table
// ---------------------------------------------------------------------------

TEST(ByteToUnicodeTest, MatchesGpt2Table) {
  // Printable bytes map to themselves; the others, in byte order, to U+0100...:
  // bytes 0..32 -> U+0100..U+0120, 127..160 -> U+0121..U+0142, 173 -> U+0143.
  EXPECT_EQ(ByteToUnicode('A'), "A");
  EXPECT_EQ(ByteToUnicode('~'), "~");
  EXPECT_EQ(ByteToUnicode(0xA1), Utf8(0xA1));
  EXPECT_EQ(ByteToUnicode(0xFF), Utf8(0xFF));
  EXPECT_EQ(ByteToUnicode(0), Utf8(0x100));
  EXPECT_EQ(ByteToUnicode('\t'), "ĉ");
  EXPECT_EQ(ByteToUnicode('\n'), "Ċ");
  EXPECT_EQ(ByteToUnicode(' '), "Ġ");
  EXPECT_EQ(ByteToUnicode(127), "ġ");
  EXPECT_EQ(ByteToUnicode(160), "ł");
  EXPECT_EQ(ByteToUnicode(173), "Ń");
  // A bijection onto 256 distinct characters.
  std::set<std::string> seen;
  for (int b = 0; b < 256; ++b) seen.insert(ByteToUnicode(uint8_t(b)));
  EXPECT_EQ(seen.size(), 256u);
}

// ---------------------------------------------------------------------------
// DeepSeek-V3's pre-tokenizer
// ---------------------------------------------------------------------------

using Pieces = std::vector<std::string>;

class DeepSeekSplitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tok_ = MustLoad(ByteLevelTokenizerJson());
    ASSERT_NE(tok_, nullptr);
  }
  std::vector<std::string> Split(absl::string_view text) {
    auto p = tok_->PreTokenize(text);
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() ? *p : std::vector<std::string>{};
  }
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(DeepSeekSplitTest, DigitsInGroupsOfThree) {
  // Split 1 (\p{N}{1,3}) isolates digit runs three at a time, left to right.
  EXPECT_EQ(Split("1234567"), (Pieces{"123", "456", "7"}));
  EXPECT_EQ(Split("abc12345def"), (Pieces{"abc", "123", "45", "def"}));
  // Separators split the runs first: "1" "," "234" ...
  EXPECT_EQ(Split("1,234,567.89"), (Pieces{"1", ",", "234", ",", "567", ".", "89"}));
  EXPECT_EQ(Split("$100.50"), (Pieces{"$", "100", ".", "50"}));
}

TEST_F(DeepSeekSplitTest, CjkRuns) {
  // Split 2 isolates runs of CJK ideographs (一-龥), hiragana and katakana.
  EXPECT_EQ(Split("你好世界hello"), (Pieces{"你好世界", "hello"}));
  EXPECT_EQ(Split("カタカナとひらがな"), (Pieces{"カタカナとひらがな"}));
  EXPECT_EQ(Split("第123章"), (Pieces{"第", "123", "章"}));
  // Hangul is outside the class: it is a letter run for split 3.
  EXPECT_EQ(Split("한국어 text"), (Pieces{"한국어", " text"}));
  // "Hello, 世界! 2024年12月31日": digits in threes, CJK isolated, ", " -> "," " ".
  EXPECT_EQ(Split("Hello, 世界! 2024年12月31日"),
            (Pieces{"Hello", ",", " ", "世界", "!", " ", "202", "4", "年", "12", "月", "31", "日"}));
}

TEST_F(DeepSeekSplitTest, PunctuationAndLetters) {
  // One ASCII punctuation glued to the letters that follow ("[punct][A-Za-z]+"),
  // " (" as a punctuation run with its leading space, "'t" as punct + letters.
  EXPECT_EQ(Split(".hello (foo) don't"),
            (Pieces{".hello", " (", "foo", ")", " don", "'t"}));
  EXPECT_EQ(Split("a, b"), (Pieces{"a", ",", " b"}));
  EXPECT_EQ(Split("C++ is fun;x=1"), (Pieces{"C", "++", " is", " fun", ";x", "=", "1"}));
  // A combining mark stays with its letter ([\p{L}\p{M}]+).
  EXPECT_EQ(Split("e\u0301t\u00e9"), (Pieces{"e\u0301t\u00e9"}));
}

TEST_F(DeepSeekSplitTest, WhitespaceAndNewlines) {
  EXPECT_EQ(Split("a\n\nb"), (Pieces{"a", "\n\n", "b"}));  // \s*[\r\n]+
  // "  \n" ends at the newline; then "\s+(?!\S)" takes one of the two spaces so
  // the other can lead " y".
  EXPECT_EQ(Split("x  \n  y"), (Pieces{"x", "  \n", " ", " y"}));
  // Punctuation run followed by newlines keeps them ([\r\n]*).
  EXPECT_EQ(Split("hello!!!\n"), (Pieces{"hello", "!!!\n"}));
  EXPECT_EQ(Split("  leading"), (Pieces{" ", " leading"}));
  EXPECT_EQ(Split("trailing  "), (Pieces{"trailing", "  "}));
  // A tab is not a letter, punctuation or symbol: it may lead a word.
  EXPECT_EQ(Split("tab\tsep"), (Pieces{"tab", "\tsep"}));
  EXPECT_EQ(Split(""), Pieces{});
}

// ---------------------------------------------------------------------------
// Split behaviours and ByteLevel's own regex (examples from the HF docs)
// ---------------------------------------------------------------------------

std::string SplitTokenizerJson(absl::string_view behavior, bool invert) {
  return absl::StrCat(
      R"({"normalizer": null, "decoder": {"type": "ByteLevel"},
          "pre_tokenizer": {"type": "Split", "pattern": {"String": "-"}, "behavior": ")",
      behavior, R"(", "invert": )", invert ? "true" : "false", R"(},
          "model": {"type": "BPE", "vocab": {)", ByteVocabEntries(), R"(}, "merges": []}})");
}

TEST(SplitBehaviorTest, AllBehaviors) {
  const std::string text = "the-final--countdown";
  struct Case {
    const char* behavior;
    bool invert;
    Pieces expected;
  } cases[] = {
      {"Isolated", false, {"the", "-", "final", "-", "-", "countdown"}},
      {"Removed", false, {"the", "final", "countdown"}},
      {"MergedWithPrevious", false, {"the-", "final-", "-", "countdown"}},
      {"MergedWithNext", false, {"the", "-final", "-", "-countdown"}},
      {"Contiguous", false, {"the", "-", "final", "--", "countdown"}},
      // invert: the gaps are the "matches".
      {"Isolated", true, {"the", "-", "final", "-", "-", "countdown"}},
      {"Removed", true, {"-", "-", "-"}},
      {"MergedWithPrevious", true, {"the", "-final", "-", "-countdown"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(absl::StrCat(c.behavior, c.invert ? " inverted" : ""));
    auto tok = MustLoad(SplitTokenizerJson(c.behavior, c.invert));
    ASSERT_NE(tok, nullptr);
    auto pieces = tok->PreTokenize(text);
    ASSERT_TRUE(pieces.ok()) << pieces.status();
    EXPECT_EQ(*pieces, c.expected);
    // Removed drops text; everything else keeps every byte.
    if (std::string(c.behavior) != "Removed") {
      EXPECT_EQ(MustDecode(*tok, MustEncode(*tok, text), false), text);
    }
  }
}

TEST(ByteLevelPreTokenizerTest, Gpt2RegexAndPrefixSpace) {
  std::string json = absl::StrCat(
      R"({"decoder": {"type": "ByteLevel"},
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": true, "use_regex": true},
          "model": {"type": "BPE", "vocab": {)", ByteVocabEntries(), R"(}, "merges": []}})");
  auto tok = MustLoad(json);
  ASSERT_NE(tok, nullptr);
  // GPT-2: contractions, " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+", trailing spaces.
  // add_prefix_space turns "Hello" into " Hello".
  auto p = tok->PreTokenize("Hello world's 42!!  x");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, (Pieces{" Hello", " world", "'s", " 42", "!!", " ", " x"}));
  // The prefix space is part of the encoding (as HF does): " Hi" -> Ġ H i.
  EXPECT_EQ(MustEncode(*tok, "Hi"), (std::vector<int32_t>{32, 'H', 'i'}));
  EXPECT_EQ(MustDecode(*tok, {32, 'H', 'i'}, false), " Hi");
}

// ---------------------------------------------------------------------------
// Byte-level round trips on the tiny preset
// ---------------------------------------------------------------------------

TEST(TinyTokenizerTest, WrittenFileLoadsWithExpectedShape) {
  const std::string path = TempPath("tiny.json");
  ASSERT_TRUE(WriteByteLevelTokenizer(path).ok());
  auto tok = Tokenizer::Load(path);
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::remove(path.c_str());
  EXPECT_EQ((*tok)->vocab_size(), 258);
  EXPECT_EQ((*tok)->bos_id(), 256);
  EXPECT_EQ((*tok)->eos_id(), 257);
  EXPECT_TRUE((*tok)->IsSpecial(256));
  EXPECT_TRUE((*tok)->IsSpecial(257));
  for (int b = 0; b < 256; ++b) {
    EXPECT_EQ((*tok)->IdToToken(b), ByteToUnicode(uint8_t(b)));
    EXPECT_EQ((*tok)->TokenBytes(b), std::string(1, char(b)));
  }
  // With no merges every byte is its own token.
  const std::string text = "Tiny: 你好, world! 123\n";
  EXPECT_EQ(MustEncode(**tok, text), BytesAsIds(text));
  EXPECT_EQ(MustDecode(**tok, BytesAsIds(text), false), text);
}

TEST(TinyTokenizerTest, RoundTripsArbitraryUtf8) {
  auto tok = MustLoad(ByteLevelTokenizerJson());
  ASSERT_NE(tok, nullptr);
  const std::vector<std::string> fixed = {
      "",
      "plain ascii",
      "emoji 😀👍🏽🇺🇸 and ZWJ 👨‍👩‍👧",
      "中文，日本語のテキスト、한국어",
      std::string("control\x01\x02\x1f\x7f chars\ttab\r\nCRLF\0nul", 36),
      "combining e\u0301 and BOM \uFEFF and NEL \u0085 and NBSP \u00A0",
      "max code point \U0010FFFF and U+FFFD \uFFFD itself",
      "   leading and trailing   ",
      "<｜begin▁of▁sentence｜>with specials<｜end▁of▁sentence｜>",
  };
  for (const std::string& s : fixed) {
    SCOPED_TRACE(s);
    std::vector<int32_t> ids = MustEncode(*tok, s);
    EXPECT_EQ(MustDecode(*tok, ids, false), s);
  }
  // Random code points from every plane (no surrogates).
  std::mt19937_64 rng(42);
  for (int iter = 0; iter < 500; ++iter) {
    std::string s;
    int n = int(rng() % 40);
    for (int i = 0; i < n; ++i) {
      uint32_t cp;
      switch (rng() % 4) {
        case 0: cp = uint32_t(rng() % 0x80); break;
        case 1: cp = 0x80 + uint32_t(rng() % (0x800 - 0x80)); break;
        case 2: do { cp = 0x800 + uint32_t(rng() % (0x10000 - 0x800)); } while (cp >= 0xD800 && cp <= 0xDFFF); break;
        default: cp = 0x10000 + uint32_t(rng() % (0x110000 - 0x10000)); break;
      }
      s += Utf8(cp);
    }
    ASSERT_TRUE(IsValidUtf8(s));
    std::vector<int32_t> ids = MustEncode(*tok, s);
    ASSERT_EQ(ids, BytesAsIds(s)) << "iteration " << iter;  // no merges: one id per byte
    ASSERT_EQ(MustDecode(*tok, ids, false), s) << "iteration " << iter;
  }
}

TEST(TinyTokenizerTest, SpecialTokensInText) {
  auto tok = MustLoad(ByteLevelTokenizerJson());
  ASSERT_NE(tok, nullptr);
  std::string text = absl::StrCat(kDeepSeekBos, "Hi", kDeepSeekEos);
  EXPECT_EQ(MustEncode(*tok, text), (std::vector<int32_t>{256, 'H', 'i', 257}));
  EXPECT_EQ(MustDecode(*tok, {256, 'H', 'i', 257}, true), "Hi");
  EXPECT_EQ(MustDecode(*tok, {256, 'H', 'i', 257}, false), text);
  // A truncated special token is ordinary text.
  std::string partial = "<｜begin▁of";
  EXPECT_EQ(MustEncode(*tok, partial), BytesAsIds(partial));
}

TEST(TinyTokenizerTest, InvalidBytesDecodeLikeFromUtf8Lossy) {
  auto tok = MustLoad(ByteLevelTokenizerJson());
  ASSERT_NE(tok, nullptr);
  struct Case {
    std::string bytes, expected;
  } cases[] = {
      {"\xE4\xBD", kFffd},                         // truncated 3-byte char: one U+FFFD
      {"\xFF" "A", kFffd + "A"},                   // never-valid byte
      {"\xF0\x80" "A", kFffd + kFffd + "A"},       // F0 needs 90..BF next: two subparts
      {"\xED\xA0\x80", kFffd + kFffd + kFffd},     // surrogate: each byte on its own
      {"\xC0\xAF", kFffd + kFffd},                 // overlong
      {"a\xE4\xBD\xA0" "b", "a你b"},              // valid
      {"\xE4\xBD" "\xE5\xA5\xBD", kFffd + "好"},  // broken char then a good one
      {"\xF4\x90\x80\x80", kFffd + kFffd + kFffd + kFffd},  // > U+10FFFF
  };
  for (const Case& c : cases) {
    EXPECT_EQ(MustDecode(*tok, BytesAsIds(c.bytes), false), c.expected);
  }
}

TEST(TinyTokenizerTest, EncodeRejectsInvalidUtf8) {
  auto tok = MustLoad(ByteLevelTokenizerJson());
  ASSERT_NE(tok, nullptr);
  auto ids = tok->Encode("abc\xFF");
  ASSERT_FALSE(ids.ok());
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(ids.status().message()), HasSubstr("not valid UTF-8 at byte 3"));
}

// ---------------------------------------------------------------------------
// Streaming detokenizer
// ---------------------------------------------------------------------------

TEST(StreamingDetokenizerTest, HoldsBackPartialCharacters) {
  auto tok = MustLoad(ByteLevelTokenizerJson());
  ASSERT_NE(tok, nullptr);
  StreamingDetokenizer st(*tok, /*skip_special=*/true);
  // "a😀" = 61 F0 9F 98 80: nothing of the emoji comes out until its 4th byte.
  const std::string text = "a😀";
  std::vector<std::string> outs;
  std::vector<size_t> pending;
  for (int32_t id : BytesAsIds(text)) {
    auto o = st.Add(id);
    ASSERT_TRUE(o.ok());
    outs.push_back(*o);
    pending.push_back(st.pending_bytes());
  }
  EXPECT_EQ(outs, (std::vector<std::string>{"a", "", "", "", "😀"}));
  EXPECT_EQ(pending, (std::vector<size_t>{0, 1, 2, 3, 0}));
  EXPECT_EQ(st.Finish(), "");
  // A broken sequence is emitted as U+FFFD as soon as it cannot be completed.
  EXPECT_EQ(*st.Add(0xE4), "");
  EXPECT_EQ(*st.Add('A'), kFffd + "A");
  // Held-back bytes at the end come out as one U+FFFD, like Decode.
  EXPECT_EQ(*st.Add(0xE4), "");
  EXPECT_EQ(*st.Add(0xBD), "");
  EXPECT_EQ(st.Finish(), kFffd);
  // Special tokens are skipped when asked; unknown ids are rejected.
  EXPECT_EQ(*st.Add(256), "");
  EXPECT_FALSE(st.Add(258).ok());
  StreamingDetokenizer keep(*tok, /*skip_special=*/false);
  EXPECT_EQ(*keep.Add(257), kDeepSeekEos);
}

TEST(StreamingDetokenizerTest, MatchesDecodeOnRandomStreams) {
  auto tok = MustLoad(ByteLevelTokenizerJson());
  ASSERT_NE(tok, nullptr);
  std::mt19937_64 rng(7);
  const std::vector<std::string> alphabet = {"a", " ", "é", "你", "😀", "\n"};
  for (int iter = 0; iter < 2000; ++iter) {
    // Mostly valid UTF-8 with random stray bytes and special tokens mixed in.
    std::vector<int32_t> ids;
    int n = int(rng() % 24);
    for (int i = 0; i < n; ++i) {
      uint64_t r = rng() % 10;
      if (r < 6) {
        for (int32_t b : BytesAsIds(alphabet[rng() % alphabet.size()])) ids.push_back(b);
      } else if (r < 9) {
        ids.push_back(int32_t(rng() % 256));
      } else {
        ids.push_back(256 + int32_t(rng() % 2));
      }
    }
    for (bool skip : {false, true}) {
      StreamingDetokenizer st(*tok, skip);
      std::string streamed;
      for (int32_t id : ids) {
        auto o = st.Add(id);
        ASSERT_TRUE(o.ok());
        ASSERT_TRUE(IsValidUtf8(*o)) << "iteration " << iter;  // never a partial character
        streamed += *o;
      }
      std::string tail = st.Finish();
      ASSERT_TRUE(IsValidUtf8(tail));
      streamed += tail;
      ASSERT_EQ(streamed, MustDecode(*tok, ids, skip)) << "iteration " << iter;
    }
  }
}

TEST(StreamingDetokenizerTest, MultiByteTokens) {
  // With merged tokens a single id may complete one character and start the next.
  std::string json = absl::StrCat(
      R"({"decoder": {"type": "ByteLevel"}, "pre_tokenizer": null,
          "model": {"type": "BPE", "vocab": {)", ByteVocabEntries(), R"(,
            "\u00e4\u00bd": 256, "\u0142\u00e5\u00a5": 257, "\u00bd\u0142": 258},
            "merges": []}})");
  // 256 = bytes E4 BD; 257 = A0 E5 A5; 258 = BD A0. "你" = E4 BD A0, "好" = E5 A5 BD.
  auto tok = MustLoad(json);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->TokenBytes(256), "\xE4\xBD");
  EXPECT_EQ(tok->TokenBytes(257), "\xA0\xE5\xA5");
  StreamingDetokenizer st(*tok, false);
  EXPECT_EQ(*st.Add(256), "");
  EXPECT_EQ(*st.Add(257), "你");
  EXPECT_EQ(st.pending_bytes(), 2u);
  EXPECT_EQ(*st.Add(0xBD), "好");
  EXPECT_EQ(st.Finish(), "");
}

// ---------------------------------------------------------------------------
// Vocabulary gaps: unk_token, fuse_unk, byte_fallback, a null pre-tokenizer
// ---------------------------------------------------------------------------

std::string CharTokenizerJson(absl::string_view extra_model_fields) {
  return absl::StrCat(R"({"decoder": {"type": "ByteLevel"}, "pre_tokenizer": null,
      "normalizer": {"type": "Sequence", "normalizers": []},
      "model": {"type": "BPE", )", extra_model_fields, R"(
        "vocab": {"a": 0, "b": 1, "ab": 2, "<unk>": 3, "<0x63>": 4},
        "merges": ["a b"]}})");
}

TEST(VocabularyGapTest, NullPreTokenizerMergesWholeText) {
  auto tok = MustLoad(CharTokenizerJson(""));
  ASSERT_NE(tok, nullptr);
  // One word "abab": (a,b)@0 and (a,b)@2 both rank 0 -> [ab][ab].
  EXPECT_EQ(MustEncode(*tok, "abab"), (std::vector<int32_t>{2, 2}));
  EXPECT_EQ(MustEncode(*tok, "aab"), (std::vector<int32_t>{0, 2}));
  // 'c' is not in the vocabulary and there is no unk_token: an error naming it.
  auto ids = tok->Encode("abc");
  ASSERT_FALSE(ids.ok());
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(ids.status().message()), HasSubstr("U+0063"));
}

TEST(VocabularyGapTest, UnkTokenAndFusing) {
  auto tok = MustLoad(CharTokenizerJson(R"("unk_token": "<unk>", "fuse_unk": false,)"));
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(MustEncode(*tok, "axyb"), (std::vector<int32_t>{0, 3, 3, 1}));
  auto fused = MustLoad(CharTokenizerJson(R"("unk_token": "<unk>", "fuse_unk": true,)"));
  ASSERT_NE(fused, nullptr);
  EXPECT_EQ(MustEncode(*fused, "axyb"), (std::vector<int32_t>{0, 3, 1}));
  EXPECT_EQ(MustEncode(*fused, "xab"), (std::vector<int32_t>{3, 2}));
}

TEST(VocabularyGapTest, ByteFallback) {
  auto tok = MustLoad(CharTokenizerJson(R"("byte_fallback": true, "unk_token": "<unk>",)"));
  ASSERT_NE(tok, nullptr);
  // 'c' (0x63) has a <0x63> token; 'd' has none and becomes <unk>.
  EXPECT_EQ(MustEncode(*tok, "acd"), (std::vector<int32_t>{0, 4, 3}));
}

// ---------------------------------------------------------------------------
// The real DeepSeek-V3 tokenizer.json, when one is available
// ---------------------------------------------------------------------------

TEST(DeepSeekV3TokenizerTest, MatchesHuggingFaceIds) {
  // PD_DEEPSEEK_TOKENIZER=/path/to/DeepSeek-V3/tokenizer.json enables this test.
  // The expected ids were produced by huggingface/tokenizers (Rust, via its Node
  // binding) from the same file with add_special_tokens = false.
  const char* path = std::getenv("PD_DEEPSEEK_TOKENIZER");
  if (path == nullptr) GTEST_SKIP() << "PD_DEEPSEEK_TOKENIZER is not set";
  auto tok = Tokenizer::Load(path);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 128815);
  EXPECT_EQ((*tok)->bos_id(), 0);
  EXPECT_EQ((*tok)->eos_id(), 1);
  struct Case {
    const char* text;
    std::vector<int32_t> ids;
  } cases[] = {
      {"Hello world 12345 你好世界", {19923, 2058, 223, 6895, 1883, 223, 30594, 3427}},
      {"<｜begin▁of▁sentence｜>hi", {0, 6366}},
      {"def f(x):\n    return x**2  # square\n",
       {3465, 285, 4042, 3395, 361, 1354, 1527, 666, 20, 223, 1823, 5080, 201}},
      {"emoji 😀 and ünïcödé, 2024年12月31日!",
       {18872, 7063, 53769, 225, 305, 10943, 80, 16709, 69, 54879, 619, 14, 223, 939, 22, 695,
        736, 1266, 2181, 1080, 3}},
      {"  \n\n\tmixed   whitespace \r\n", {6776, 21840, 5053, 262, 37899, 5790, 223, 204, 201}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.text);
    EXPECT_EQ(MustEncode(**tok, c.text), c.ids);
    EXPECT_EQ(MustDecode(**tok, c.ids, false), c.text);
  }
}

// ---------------------------------------------------------------------------
// Malformed files
// ---------------------------------------------------------------------------

void ExpectLoadError(const std::string& json, absl::string_view needle) {
  auto tok = Tokenizer::FromJson(json);
  ASSERT_FALSE(tok.ok()) << "accepted: " << json.substr(0, 200);
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr(std::string(needle)));
}

TEST(MalformedTokenizerTest, MissingFileIsNotFound) {
  auto tok = Tokenizer::Load("/nonexistent/dir/tokenizer.json");
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr("/nonexistent/dir/tokenizer.json"));
}

TEST(MalformedTokenizerTest, BadJson) {
  ExpectLoadError("{\"model\": ", "bad JSON");
  ExpectLoadError("{\"model\": {}} trailing", "bad JSON");
  ExpectLoadError("[1, 2]", "expected a JSON object");
  // A file with bad JSON reports its path too.
  const std::string path = TempPath("bad.json");
  ASSERT_TRUE(WriteStringToFile(path, "{ not json").ok());
  auto tok = Tokenizer::Load(path);
  std::remove(path.c_str());
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr(path));
}

TEST(MalformedTokenizerTest, UnsupportedPartsNameTheField) {
  const std::string good = ByteLevelTokenizerJson();
  auto with = [&good](absl::string_view from, absl::string_view to) {
    std::string s = absl::StrReplaceAll(good, {{from, to}});
    EXPECT_NE(s, good) << "replacement of " << from << " did not apply";
    return s;
  };
  ExpectLoadError(with(R"("type":"BPE")", R"("type":"WordPiece")"), "model.type");
  ExpectLoadError(with(R"({"type":"ByteLevel","add_prefix_space":false)",
                       R"({"type":"Whitespace","add_prefix_space":false)"),
                  "pre_tokenizer.pretokenizers[3].type");
  ExpectLoadError(with(R"("Regex":"\\p{N}{1,3}")", R"("Regex":"(\\p{N}")"),
                  "pre_tokenizer.pretokenizers[0].pattern.Regex");
  ExpectLoadError(with(R"("Regex":"\\p{N}{1,3}")", R"("Regex":"(\\p{N}")"), "does not compile");
  ExpectLoadError(with(R"("behavior":"Isolated")", R"("behavior":"Sideways")"),
                  "pre_tokenizer.pretokenizers[0].behavior");
  ExpectLoadError(with(R"("decoder":{"type":"ByteLevel")", R"("decoder":{"type":"WordPiece")"),
                  "decoder.type");
  ExpectLoadError(with(R"("normalizer":null)", R"("normalizer":{"type":"NFKC"})"), "normalizer");
  ExpectLoadError(with(R"("merges":[])", R"("merges":["a zz"])"), "model.merges[0]");
  ExpectLoadError(with(R"("merges":[])", R"("merges":[3])"), "model.merges[0]");
  ExpectLoadError(with(R"("unk_token":null)", R"("unk_token":"<nope>")"), "model.unk_token");
  ExpectLoadError(with(R"("dropout":null)", R"("dropout":0.1)"), "model.dropout");
  ExpectLoadError(with(R"("id":256,)", R"("id":"x",)"), "added_tokens[0].id");
  ExpectLoadError(with(R"("vocab":{)", R"("vocab":{"dup":0,)"), "model.vocab");
  ExpectLoadError(with(R"("model":{)", R"("model_":{)"), "model: missing");
}

}  // namespace
}  // namespace pd::model
