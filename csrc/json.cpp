// Strict recursive-descent JSON parser; see json.h for what "strict" rejects.
#include "json.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <numeric>

namespace shortrt::json {

// ---- Value ----------------------------------------------------------------

const char* type_name(Value::Type type) {
  switch (type) {
    case Value::Type::Null: return "null";
    case Value::Type::Bool: return "bool";
    case Value::Type::Number: return "number";
    case Value::Type::String: return "string";
    case Value::Type::Array: return "array";
    case Value::Type::Object: return "object";
  }
  return "?";
}

Value Value::make_bool(bool b) {
  Value v;
  v.type_ = Type::Bool;
  v.bool_ = b;
  return v;
}

Value Value::make_number(double d) {
  Value v;
  v.type_ = Type::Number;
  v.number_ = d;
  return v;
}

Value Value::make_int(int64_t i) {
  Value v;
  v.type_ = Type::Number;
  v.number_ = static_cast<double>(i);
  v.int_ = i;
  v.exact_int_ = true;
  return v;
}

Value Value::make_string(std::string s) {
  Value v;
  v.type_ = Type::String;
  v.string_ = std::move(s);
  return v;
}

Value Value::make_array(Array items) {
  Value v;
  v.type_ = Type::Array;
  v.array_ = std::move(items);
  return v;
}

Value Value::make_object(Object members) {
  Value v;
  v.type_ = Type::Object;
  v.object_ = std::move(members);
  return v;
}

static void expect_type(Value::Type expected, Value::Type found) {
  if (expected != found)
    throw Error(std::string("json: expected ") + type_name(expected) + ", found " + type_name(found));
}

// 2^63 as a double; int64 holds [-2^63, 2^63).
static constexpr double kTwoPow63 = 9223372036854775808.0;

static bool double_is_int64(double d) {
  return std::isfinite(d) && d == std::trunc(d) && d >= -kTwoPow63 && d < kTwoPow63;
}

bool Value::is_integer() const {
  return type_ == Type::Number && (exact_int_ || double_is_int64(number_));
}

bool Value::as_bool() const {
  expect_type(Type::Bool, type_);
  return bool_;
}

double Value::as_number() const {
  expect_type(Type::Number, type_);
  return number_;
}

int64_t Value::as_int() const {
  expect_type(Type::Number, type_);
  if (exact_int_) return int_;
  if (!double_is_int64(number_)) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.17g", number_);
    throw Error(std::string("json: expected an integer, found ") + buf);
  }
  return static_cast<int64_t>(number_);
}

const std::string& Value::as_string() const {
  expect_type(Type::String, type_);
  return string_;
}

const Value::Array& Value::as_array() const {
  expect_type(Type::Array, type_);
  return array_;
}

const Value::Object& Value::as_object() const {
  expect_type(Type::Object, type_);
  return object_;
}

const Value* Value::find(const std::string& key) const {
  if (type_ != Type::Object) return nullptr;
  for (const auto& member : object_)
    if (member.first == key) return &member.second;
  return nullptr;
}

const Value& Value::at(const std::string& key) const {
  expect_type(Type::Object, type_);
  const Value* v = find(key);
  if (!v) throw Error("json: missing key '" + key + "'");
  return *v;
}

// ---- Parser ---------------------------------------------------------------

namespace {

// For a valid JSON number that is not zero, roughly log10 of its magnitude:
// only its sign matters, to tell an underflow from an overflow.
int64_t decimal_magnitude(const char* p, const char* end) {
  if (*p == '-') ++p;
  int64_t magnitude = 0;
  if (*p != '0') {
    const char* q = p;
    while (q < end && *q >= '0' && *q <= '9') ++q;
    magnitude = (q - p) - 1;
    p = q;
  } else {
    ++p;
    if (p < end && *p == '.') {
      ++p;
      int64_t zeros = 0;
      while (p < end && *p == '0') ++p, ++zeros;
      magnitude = -(zeros + 1);
    }
  }
  while (p < end && *p != 'e' && *p != 'E') ++p;
  if (p < end) {
    ++p;
    bool negative = *p == '-';
    if (*p == '-' || *p == '+') ++p;
    int64_t exponent = 0;
    for (; p < end; ++p) exponent = std::min<int64_t>(exponent * 10 + (*p - '0'), int64_t{1} << 40);  // saturate
    magnitude += negative ? -exponent : exponent;
  }
  return magnitude;
}

class Parser {
 public:
  explicit Parser(std::string_view text) : text_(text) {}

  Value parse_document() {
    skip_whitespace();
    Value v = parse_value();
    skip_whitespace();
    if (pos_ != text_.size()) fail("unexpected " + describe(pos_) + " after the document");
    return v;
  }

 private:
  std::string_view text_;
  size_t pos_ = 0;
  int depth_ = 0;

  [[noreturn]] void fail(const std::string& what) const { fail_at(what, pos_); }
  [[noreturn]] void fail_at(const std::string& what, size_t offset) const {
    throw Error("json: " + what + " at offset " + std::to_string(offset));
  }

  bool at_end() const { return pos_ >= text_.size(); }
  unsigned char peek() const { return static_cast<unsigned char>(text_[pos_]); }

  // "'x'" for a printable byte, "byte 0xNN" otherwise, "end of input" past the end.
  std::string describe(size_t offset) const {
    if (offset >= text_.size()) return "end of input";
    unsigned char c = static_cast<unsigned char>(text_[offset]);
    char buf[16];
    if (c >= 0x20 && c < 0x7f)
      std::snprintf(buf, sizeof buf, "'%c'", c);
    else
      std::snprintf(buf, sizeof buf, "byte 0x%02x", c);
    return buf;
  }

  void skip_whitespace() {
    while (!at_end()) {
      char c = text_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      ++pos_;
    }
  }

  void expect_char(char c, const char* what) {
    if (at_end() || text_[pos_] != c) fail(std::string("expected ") + what + ", found " + describe(pos_));
    ++pos_;
  }

  Value parse_value() {
    if (at_end()) fail("unexpected end of input");
    switch (text_[pos_]) {
      case '{': return parse_object();
      case '[': return parse_array();
      case '"': return Value::make_string(parse_string());
      case 't': parse_literal("true"); return Value::make_bool(true);
      case 'f': parse_literal("false"); return Value::make_bool(false);
      case 'n': parse_literal("null"); return Value();
      default:
        if (text_[pos_] == '-' || (text_[pos_] >= '0' && text_[pos_] <= '9')) return parse_number();
        fail("unexpected " + describe(pos_));
    }
  }

  void parse_literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) fail("invalid literal (expected '" + std::string(word) + "')");
    pos_ += word.size();
  }

  void enter_container() {
    if (++depth_ > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
  }

  Value parse_array() {
    enter_container();
    ++pos_;  // '['
    Value::Array items;
    skip_whitespace();
    if (!at_end() && text_[pos_] == ']') {
      ++pos_;
    } else {
      for (;;) {
        skip_whitespace();
        items.push_back(parse_value());
        skip_whitespace();
        if (!at_end() && text_[pos_] == ',') { ++pos_; continue; }
        expect_char(']', "',' or ']' in array");
        break;
      }
    }
    --depth_;
    return Value::make_array(std::move(items));
  }

  Value parse_object() {
    enter_container();
    ++pos_;  // '{'
    Value::Object members;
    std::vector<size_t> key_offsets;
    skip_whitespace();
    if (!at_end() && text_[pos_] == '}') {
      ++pos_;
    } else {
      for (;;) {
        skip_whitespace();
        if (at_end() || text_[pos_] != '"') fail("expected a string key, found " + describe(pos_));
        key_offsets.push_back(pos_);
        std::string key = parse_string();
        skip_whitespace();
        expect_char(':', "':' after object key");
        skip_whitespace();
        Value v = parse_value();
        members.emplace_back(std::move(key), std::move(v));
        skip_whitespace();
        if (!at_end() && text_[pos_] == ',') { ++pos_; continue; }
        expect_char('}', "',' or '}' in object");
        break;
      }
    }
    check_unique_keys(members, key_offsets);
    --depth_;
    return Value::make_object(std::move(members));
  }

  // Duplicate keys make a document ambiguous (which tensor entry is real?), so
  // they are an error. Sorting keeps hostile headers with many keys O(n log n).
  void check_unique_keys(const Value::Object& members, const std::vector<size_t>& offsets) const {
    if (members.size() < 2) return;
    if (members.size() <= 8) {  // the common small object: no allocation
      for (size_t i = 1; i < members.size(); ++i)
        for (size_t j = 0; j < i; ++j)
          if (members[i].first == members[j].first) fail_at("duplicate key '" + members[i].first + "'", offsets[i]);
      return;
    }
    std::vector<size_t> order(members.size());
    std::iota(order.begin(), order.end(), size_t{0});
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      int c = members[a].first.compare(members[b].first);
      return c != 0 ? c < 0 : a < b;
    });
    for (size_t i = 1; i < order.size(); ++i)
      if (members[order[i]].first == members[order[i - 1]].first)
        fail_at("duplicate key '" + members[order[i]].first + "'", offsets[order[i]]);
  }

  unsigned hex4() {
    if (text_.size() - pos_ < 4) fail("truncated \\u escape");
    unsigned value = 0;
    for (int i = 0; i < 4; ++i) {
      char c = text_[pos_ + i];
      unsigned digit;
      if (c >= '0' && c <= '9') digit = c - '0';
      else if (c >= 'a' && c <= 'f') digit = c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') digit = c - 'A' + 10;
      else fail_at("invalid hex digit in \\u escape", pos_ + i);
      value = value * 16 + digit;
    }
    pos_ += 4;
    return value;
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  // After the backslash: one escape, appended to out as UTF-8.
  void parse_escape(std::string& out) {
    size_t start = pos_ - 1;
    if (at_end()) fail("unterminated string");
    char c = text_[pos_++];
    switch (c) {
      case '"': out += '"'; return;
      case '\\': out += '\\'; return;
      case '/': out += '/'; return;
      case 'b': out += '\b'; return;
      case 'f': out += '\f'; return;
      case 'n': out += '\n'; return;
      case 'r': out += '\r'; return;
      case 't': out += '\t'; return;
      case 'u': break;
      default: fail_at("invalid escape '\\" + std::string(1, c) + "'", start);
    }
    uint32_t cp = hex4();
    if (cp >= 0xDC00 && cp <= 0xDFFF) fail_at("unpaired low surrogate in \\u escape", start);
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      // A high surrogate must be followed by an escaped low surrogate.
      if (text_.substr(pos_, 2) != "\\u") fail_at("unpaired high surrogate in \\u escape", start);
      pos_ += 2;
      uint32_t low = hex4();
      if (low < 0xDC00 || low > 0xDFFF) fail_at("unpaired high surrogate in \\u escape", start);
      cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
    }
    append_utf8(out, cp);
  }

  // One UTF-8 encoded character starting at pos_ (first byte >= 0x80): checks
  // lengths, continuation bytes, and rejects overlong forms and surrogates.
  void copy_utf8_char(std::string& out) {
    unsigned char b0 = peek();
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (b0 >= 0xC2 && b0 <= 0xDF) len = 2;
    else if (b0 >= 0xE0 && b0 <= 0xEF) {
      len = 3;
      if (b0 == 0xE0) lo = 0xA0;
      if (b0 == 0xED) hi = 0x9F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      len = 4;
      if (b0 == 0xF0) lo = 0x90;
      if (b0 == 0xF4) hi = 0x8F;
    } else {
      fail("invalid UTF-8 in string");
    }
    if (text_.size() - pos_ < len) fail("invalid UTF-8 in string");
    for (size_t i = 1; i < len; ++i) {
      unsigned char b = static_cast<unsigned char>(text_[pos_ + i]);
      unsigned char min = i == 1 ? lo : 0x80, max = i == 1 ? hi : 0xBF;
      if (b < min || b > max) fail("invalid UTF-8 in string");
    }
    out.append(text_.data() + pos_, len);
    pos_ += len;
  }

  std::string parse_string() {
    size_t start = pos_;
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      if (at_end()) fail_at("unterminated string", start);
      unsigned char c = peek();
      if (c == '"') { ++pos_; return out; }
      if (c == '\\') { ++pos_; parse_escape(out); continue; }
      if (c < 0x20) fail("unescaped control character in string");
      if (c >= 0x80) { copy_utf8_char(out); continue; }
      // Copy the run of plain ASCII up to the next special byte in one go.
      size_t run = pos_ + 1;
      while (run < text_.size()) {
        unsigned char r = static_cast<unsigned char>(text_[run]);
        if (r == '"' || r == '\\' || r < 0x20 || r >= 0x80) break;
        ++run;
      }
      out.append(text_.data() + pos_, run - pos_);
      pos_ = run;
    }
  }

  void skip_digits() {
    while (!at_end() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
  }

  bool at_digit() const { return !at_end() && text_[pos_] >= '0' && text_[pos_] <= '9'; }

  Value parse_number() {
    size_t start = pos_;
    if (text_[pos_] == '-') ++pos_;
    if (!at_digit()) fail("invalid number: expected a digit");
    if (text_[pos_] == '0') {
      ++pos_;
      if (at_digit()) fail_at("invalid number: leading zero", start);
    } else {
      skip_digits();
    }
    bool integral = true;
    if (!at_end() && text_[pos_] == '.') {
      integral = false;
      ++pos_;
      if (!at_digit()) fail("invalid number: expected a digit after '.'");
      skip_digits();
    }
    if (!at_end() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
      integral = false;
      ++pos_;
      if (!at_end() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
      if (!at_digit()) fail("invalid number: expected a digit in the exponent");
      skip_digits();
    }
    const char* first = text_.data() + start;
    const char* last = text_.data() + pos_;
    if (integral) {
      int64_t i = 0;
      auto [ptr, ec] = std::from_chars(first, last, i);
      if (ec == std::errc() && ptr == last) return Value::make_int(i);
      // Too large for int64: fall through and keep it as a double.
    }
    // from_chars is locale-independent, unlike strtod.
    double d = 0.0;
    auto [ptr, ec] = std::from_chars(first, last, d);
    if (ec == std::errc::result_out_of_range) {
      // Too small rounds to zero, as other JSON readers do; too large is an error.
      if (decimal_magnitude(first, last) < 0) return Value::make_number(*first == '-' ? -0.0 : 0.0);
      fail_at("number out of range", start);
    }
    if (ec != std::errc() || ptr != last) fail_at("invalid number", start);
    return Value::make_number(d);
  }
};

}  // namespace

Value parse(std::string_view text) { return Parser(text).parse_document(); }

Value parse_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw os_error("cannot open", path);
  std::string text;
  char buf[1 << 16];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      OsError err = os_error("cannot read", path);
      ::close(fd);
      throw err;
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  try {
    return parse(text);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
}

}  // namespace shortrt::json
