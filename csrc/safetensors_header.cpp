// The safetensors JSON header, read the way the safetensors library reads it.
//
// The library deserializes the header with serde_json into
//   struct { Option<HashMap<String, String>> __metadata__;
//            #[flatten] HashMap<String, TensorInfo> tensors; }
// and that decides details a general JSON reader (json.h) gets "wrong" for
// this purpose: repeated tensor names are allowed (the last wins), "-0" and
// "2.0" are floats and so not a dim, an entry may be an array, a number is an
// error only when serde_json's own float arithmetic overflows. So this is a
// small schema-driven parser that mirrors those rules instead of reusing
// json::parse. It validates syntax everywhere, including in ignored values.
#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <unordered_map>

#include "safetensors.h"

namespace shortrt {

std::string quoted(const std::string& s) {
  constexpr size_t kMaxShown = 120;
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < kMaxShown; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > kMaxShown) out += "...";
  return out + "'";
}

namespace {

// serde_json fails at the 128th nested container.
constexpr int kMaxDepth = 127;

// 10^0 .. 10^308, each correctly rounded, as serde_json's table holds them.
const std::array<double, 309>& pow10_table() {
  static const std::array<double, 309> table = [] {
    std::array<double, 309> t{};
    for (int i = 0; i < 309; ++i) {
      std::string text = "1e" + std::to_string(i);
      std::from_chars(text.data(), text.data() + text.size(), t[i]);
    }
    return t;
  }();
  return table;
}

// serde_json (without its float_roundtrip feature) turns significand x 10^exponent
// into a double by multiplying or dividing by a power of ten, and rejects the
// number when that overflows. This mirrors the arithmetic exactly, because
// which huge literals count as "out of range" is part of what the library accepts.
bool serde_f64_overflows(uint64_t significand, int32_t exponent) {
  double f = static_cast<double>(significand);
  for (;;) {
    uint64_t magnitude = exponent >= 0 ? static_cast<uint64_t>(exponent) : -static_cast<uint64_t>(exponent);
    if (magnitude <= 308) {
      if (exponent >= 0) return std::isinf(f * pow10_table()[magnitude]);
      return false;
    }
    if (f == 0.0) return false;
    if (exponent >= 0) return true;
    f /= 1e308;
    exponent += 308;
  }
}

// true if significand * 10 + digit would exceed UINT64_MAX (serde_json's overflow! test).
bool mul10_overflows(uint64_t significand, uint64_t digit) {
  return significand >= UINT64_MAX / 10 && (significand > UINT64_MAX / 10 || digit > UINT64_MAX % 10);
}

const char* kind_of(char c) {
  switch (c) {
    case '{': return "an object";
    case '[': return "an array";
    case '"': return "a string";
    case 't': case 'f': return "a boolean";
    case 'n': return "null";
    default: return "a number";  // callers check value_start() first
  }
}

class HeaderParser {
 public:
  explicit HeaderParser(std::string_view text) : s_(text) {}

  HeaderContents parse() {
    skip_ws();
    if (at_end()) syntax("the header holds no JSON value");
    value_start();
    if (peek() != '{') throw Error(std::string("header is ") + kind_of(peek()) + ", not a JSON object");
    enter();
    ++pos_;
    bool seen_metadata = false;
    std::unordered_map<std::string, size_t> position;  // name -> index in out_.tensors
    for (bool first = true;; first = false) {
      if (!next_member(first)) break;
      std::string key = parse_key();
      if (key == "__metadata__") {
        if (seen_metadata) throw Error("__metadata__ appears twice in the header");
        seen_metadata = true;
        parse_metadata();
        continue;
      }
      HeaderTensor t = parse_entry(key);
      auto [it, inserted] = position.emplace(t.name, out_.tensors.size());
      if (inserted)
        out_.tensors.push_back(std::move(t));
      else
        out_.tensors[it->second] = std::move(t);  // the library keeps the last entry of a repeated name
    }
    leave();
    skip_ws();
    if (!at_end()) syntax("unexpected " + describe() + " after the header object");
    return std::move(out_);
  }

 private:
  // ---- lexing ----
  bool at_end() const { return pos_ >= s_.size(); }
  char peek() const { return s_[pos_]; }
  bool at_digit() const { return !at_end() && peek() >= '0' && peek() <= '9'; }

  std::string describe() const {
    if (at_end()) return "end of header";
    unsigned char c = static_cast<unsigned char>(peek());
    char buf[16];
    if (c >= 0x20 && c < 0x7f) std::snprintf(buf, sizeof buf, "'%c'", c);
    else std::snprintf(buf, sizeof buf, "byte 0x%02x", c);
    return buf;
  }

  // Where a value must begin: a syntax error unless one can begin here.
  void value_start() {
    skip_ws();
    if (at_end()) syntax("expected a value, found end of header");
    char c = peek();
    if (!(c == '{' || c == '[' || c == '"' || c == 't' || c == 'f' || c == 'n' || c == '-' || (c >= '0' && c <= '9')))
      syntax("expected a value, found " + describe());
  }

  [[noreturn]] void syntax(const std::string& what) const {
    throw Error("header is not valid JSON (" + what + " at header byte " + std::to_string(pos_) + ")");
  }

  void skip_ws() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++pos_;
  }

  void expect(char c, const char* what) {
    skip_ws();
    if (at_end() || peek() != c) syntax(std::string("expected ") + what + ", found " + describe());
    ++pos_;
  }

  void enter() {
    if (++depth_ > kMaxDepth) syntax("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
  }
  void leave() { --depth_; }

  // In an object just after '{' (first) or after a member: true if another
  // member follows (its key is next), false after consuming '}'.
  bool next_member(bool first) {
    skip_ws();
    if (!first) {
      if (!at_end() && peek() == '}') { ++pos_; return false; }
      expect(',', "',' or '}' in object");
      skip_ws();
      if (!at_end() && peek() == '}') syntax("trailing comma in object");
    } else if (!at_end() && peek() == '}') {
      ++pos_;
      return false;
    }
    return true;
  }

  // Same for arrays, after '['.
  bool next_element(bool first) {
    skip_ws();
    if (!first) {
      if (!at_end() && peek() == ']') { ++pos_; return false; }
      expect(',', "',' or ']' in array");
      skip_ws();
      if (!at_end() && peek() == ']') syntax("trailing comma in array");
    } else if (!at_end() && peek() == ']') {
      ++pos_;
      return false;
    }
    return true;
  }

  std::string parse_key() {
    skip_ws();
    if (at_end() || peek() != '"') syntax("expected a string key, found " + describe());
    std::string key = parse_string();
    expect(':', "':' after an object key");
    skip_ws();
    return key;
  }

  unsigned hex4() {
    unsigned v = 0;
    for (int i = 0; i < 4; ++i, ++pos_) {
      if (at_end()) syntax("truncated \\u escape");
      char c = peek();
      unsigned d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : 16;
      if (d == 16) syntax("invalid hex digit in \\u escape");
      v = v * 16 + d;
    }
    return v;
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xc0 | cp >> 6);
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xe0 | cp >> 12);
      out += static_cast<char>(0x80 | (cp >> 6 & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | cp >> 18);
      out += static_cast<char>(0x80 | (cp >> 12 & 0x3f));
      out += static_cast<char>(0x80 | (cp >> 6 & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    }
  }

  // At '"'. The header as a whole was checked to be UTF-8 already.
  std::string parse_string() {
    ++pos_;
    std::string out;
    for (;;) {
      if (at_end()) syntax("unterminated string");
      unsigned char c = static_cast<unsigned char>(peek());
      if (c == '"') { ++pos_; return out; }
      if (c < 0x20) syntax("control character in a string");
      if (c != '\\') { out += static_cast<char>(c); ++pos_; continue; }
      ++pos_;
      if (at_end()) syntax("unterminated string");
      char e = peek();
      ++pos_;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xdc00 && cp <= 0xdfff) syntax("lone low surrogate in \\u escape");
          if (cp >= 0xd800 && cp <= 0xdbff) {
            if (s_.substr(pos_, 2) != "\\u") syntax("lone high surrogate in \\u escape");
            pos_ += 2;
            uint32_t low = hex4();
            if (low < 0xdc00 || low > 0xdfff) syntax("lone high surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
          }
          append_utf8(out, cp);
          break;
        }
        default: --pos_; syntax("invalid escape");
      }
    }
  }

  // A number as serde_json reads it. Returns true with `value` set for an
  // unsigned integer literal that fits u64 (what serde hands a usize); false
  // for any other valid number; throws for invalid or out-of-range ones.
  bool parse_number(uint64_t& value) {
    const bool negative = peek() == '-';
    if (negative) ++pos_;
    if (!at_digit()) syntax("invalid number");
    uint64_t sig = 0;
    int32_t exponent = 0;
    bool is_float = false, sig_full = false;
    if (peek() == '0') {
      ++pos_;
      if (at_digit()) syntax("invalid number: leading zero");
    } else {
      for (; at_digit(); ++pos_) {
        uint64_t d = peek() - '0';
        if (!sig_full && mul10_overflows(sig, d)) sig_full = is_float = true;  // now an f64 (parse_long_integer)
        if (sig_full) ++exponent;
        else sig = sig * 10 + d;
      }
    }
    if (!at_end() && peek() == '.') {
      is_float = true;
      ++pos_;
      if (!at_digit()) syntax("invalid number: expected a digit after '.'");
      bool dropping = false;  // past the digits serde keeps (parse_decimal_overflow)
      for (; at_digit(); ++pos_) {
        uint64_t d = peek() - '0';
        if (!dropping && mul10_overflows(sig, d)) dropping = true;
        if (!dropping) { sig = sig * 10 + d; --exponent; }
      }
    }
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      ++pos_;
      bool positive_exp = true;
      if (!at_end() && (peek() == '+' || peek() == '-')) {
        positive_exp = peek() == '+';
        ++pos_;
      }
      if (!at_digit()) syntax("invalid number: expected a digit in the exponent");
      int32_t exp = 0;
      bool exp_overflow = false;
      for (; at_digit(); ++pos_) {
        int32_t d = peek() - '0';
        if (!exp_overflow && (exp > INT32_MAX / 10 || (exp == INT32_MAX / 10 && d > INT32_MAX % 10))) exp_overflow = true;
        if (!exp_overflow) exp = exp * 10 + d;
      }
      if (exp_overflow) {
        if (sig != 0 && positive_exp) syntax("number out of range");
        return false;  // serde reads it as 0.0
      }
      int64_t e = positive_exp ? int64_t{exponent} + exp : int64_t{exponent} - exp;  // saturating in serde
      e = std::max<int64_t>(INT32_MIN, std::min<int64_t>(INT32_MAX, e));
      if (serde_f64_overflows(sig, static_cast<int32_t>(e))) syntax("number out of range");
      return false;
    }
    if (is_float) {
      if (serde_f64_overflows(sig, exponent)) syntax("number out of range");
      return false;
    }
    value = sig;
    return !negative;  // "-5" and even "-0" are signed, never a usize
  }

  void parse_literal(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) syntax("invalid literal (expected '" + std::string(word) + "')");
    pos_ += word.size();
  }

  // Any JSON value, checked and discarded (ignored entry fields).
  void skip_value() {
    skip_ws();
    if (at_end()) syntax("expected a value, found end of header");
    switch (peek()) {
      case '{':
        enter();
        ++pos_;
        for (bool first = true; next_member(first); first = false) {
          parse_key();
          skip_value();
        }
        leave();
        return;
      case '[':
        enter();
        ++pos_;
        for (bool first = true; next_element(first); first = false) skip_value();
        leave();
        return;
      case '"': parse_string(); return;
      case 't': parse_literal("true"); return;
      case 'f': parse_literal("false"); return;
      case 'n': parse_literal("null"); return;
      default: {
        if (peek() != '-' && !at_digit()) syntax("expected a value, found " + describe());
        uint64_t ignored;
        parse_number(ignored);
      }
    }
  }

  // The source text of the value starting here, for a message (then skipped).
  // Raw control bytes in valid JSON can only be whitespace: shown as spaces,
  // so the message stays one line.
  std::string skipped_text() {
    size_t start = pos_;
    skip_value();
    std::string text(s_.substr(start, std::min<size_t>(pos_ - start, 40)));
    for (char& c : text)
      if (static_cast<unsigned char>(c) < 0x20) c = ' ';
    if (pos_ - start > 40) text += "...";
    return text;
  }

  // ---- the schema ----
  void parse_metadata() {
    value_start();
    if (peek() == 'n') { parse_literal("null"); return; }
    if (peek() != '{') {
      throw Error(std::string("__metadata__ is ") + kind_of(peek()) + ", not a JSON object of strings");
    }
    enter();
    ++pos_;
    for (bool first = true; next_member(first); first = false) {
      std::string key = parse_key();
      value_start();
      if (peek() != '"') {
        throw Error("__metadata__ value for " + quoted(key) + " is " + kind_of(peek()) + ", not a string");
      }
      out_.metadata[key] = parse_string();  // a repeated key: the last wins, as in the library
    }
    leave();
  }

  uint64_t parse_uint(const std::string& what) {
    value_start();
    if (peek() != '-' && !at_digit()) throw Error(what + " is " + kind_of(peek()) + ", not a non-negative integer");
    size_t start = pos_;
    uint64_t v = 0;
    if (!parse_number(v))
      throw Error(what + " is " + std::string(s_.substr(start, std::min<size_t>(pos_ - start, 40))) +
                  ", not a non-negative integer (no sign, fraction or exponent, at most 2^64 - 1)");
    return v;
  }

  DType dtype_named(const std::string& name) {
    try {
      return dtype_from_name(name);
    } catch (const Error&) {
      throw Error("unknown dtype " + quoted(name));
    }
  }

  DType parse_dtype() {
    value_start();
    if (peek() == '"') return dtype_named(parse_string());
    if (peek() != '{') throw Error(std::string("'dtype' is ") + kind_of(peek()) + ", not a string");
    // serde also reads an enum from {"F32": null}.
    enter();
    ++pos_;
    if (!next_member(true)) throw Error("'dtype' is an empty object, not a string");
    std::string name = parse_key();
    value_start();
    if (peek() != 'n') throw Error("'dtype' object's value for " + quoted(name) + " is " + skipped_text() + ", not null");
    parse_literal("null");
    if (next_member(false)) throw Error("'dtype' object has more than one key");
    leave();
    return dtype_named(name);
  }

  std::vector<uint64_t> parse_shape() {
    value_start();
    if (peek() != '[') throw Error(std::string("'shape' is ") + kind_of(peek()) + ", not an array");
    enter();
    ++pos_;
    std::vector<uint64_t> shape;
    for (bool first = true; next_element(first); first = false)
      shape.push_back(parse_uint("shape dim " + std::to_string(shape.size())));
    leave();
    return shape;
  }

  void parse_offsets(HeaderTensor& t) {
    value_start();
    if (peek() != '[') throw Error(std::string("'data_offsets' is ") + kind_of(peek()) + ", not an array of two integers");
    enter();
    ++pos_;
    uint64_t v[2];
    for (int i = 0; i < 3; ++i) {
      if (!next_element(i == 0)) {
        if (i == 2) break;
        throw Error("'data_offsets' has " + std::to_string(i) + (i == 1 ? " element" : " elements") + ", not two");
      }
      if (i == 2) throw Error("'data_offsets' has more than two elements");
      v[i] = parse_uint("data_offsets[" + std::to_string(i) + "]");
    }
    leave();
    t.begin = v[0];
    t.end = v[1];
  }

  HeaderTensor parse_entry(const std::string& name) {
    HeaderTensor t;
    t.name = name;
    try {
      value_start();
      if (peek() == '[') {  // serde reads a struct from [dtype, shape, data_offsets] too
        enter();
        ++pos_;
        if (!next_element(true)) throw Error("entry is an empty array, not an object");
        t.dtype = parse_dtype();
        if (!next_element(false)) throw Error("entry array has 1 element, not [dtype, shape, data_offsets]");
        t.shape = parse_shape();
        if (!next_element(false)) throw Error("entry array has 2 elements, not [dtype, shape, data_offsets]");
        parse_offsets(t);
        if (next_element(false)) throw Error("entry array has more than 3 elements");
        leave();
        return t;
      }
      if (peek() != '{') throw Error(std::string("entry is ") + kind_of(peek()) + ", not an object");
      enter();
      ++pos_;
      bool has_dtype = false, has_shape = false, has_offsets = false;
      for (bool first = true; next_member(first); first = false) {
        std::string key = parse_key();
        bool* seen = key == "dtype" ? &has_dtype : key == "shape" ? &has_shape : key == "data_offsets" ? &has_offsets : nullptr;
        if (!seen) { skip_value(); continue; }  // unknown fields are ignored
        if (*seen) throw Error("'" + key + "' appears twice");
        *seen = true;
        if (key == "dtype") t.dtype = parse_dtype();
        else if (key == "shape") t.shape = parse_shape();
        else parse_offsets(t);
      }
      leave();
      if (!has_dtype) throw Error("missing 'dtype'");
      if (!has_shape) throw Error("missing 'shape'");
      if (!has_offsets) throw Error("missing 'data_offsets'");
    } catch (const Error& e) {
      std::string what = e.what();
      if (what.rfind("header is not valid JSON", 0) == 0) throw;
      throw Error("tensor " + quoted(name) + ": " + what);
    }
    return t;
  }

  std::string_view s_;
  size_t pos_ = 0;
  int depth_ = 0;
  HeaderContents out_;
};

}  // namespace

HeaderContents parse_header_json(std::string_view text) { return HeaderParser(text).parse(); }

}  // namespace shortrt
