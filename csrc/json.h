// A small strict JSON parser (RFC 8259) for safetensors headers, config.json
// and shortrt.json. Strict means: no comments, no trailing commas, no NaN or
// Infinity, no leading zeros, no control characters or invalid UTF-8 inside
// strings, no lone surrogates, no duplicate keys in one object, nothing but
// whitespace after the document, and at most kMaxDepth nested containers.
// Numbers too large for a double are an error; too small ones round to 0.
// Every failure throws shortrt::Error("json: <what> at offset N").
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "error.h"

namespace shortrt::json {

// Deeper documents are rejected so hostile input cannot exhaust the stack.
constexpr int kMaxDepth = 128;

class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };
  using Array = std::vector<Value>;
  using Object = std::vector<std::pair<std::string, Value>>;  // keys in file order

  Value() = default;  // null
  static Value make_bool(bool b);
  static Value make_number(double d);
  static Value make_int(int64_t i);  // an integer literal kept exactly
  static Value make_string(std::string s);
  static Value make_array(Array items);
  static Value make_object(Object members);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }
  // A number that as_int() accepts: integral and within int64.
  bool is_integer() const;
  // A number written without fraction or exponent that fits int64 (so it is
  // held exactly, beyond double's 2^53).
  bool is_integer_literal() const { return type_ == Type::Number && exact_int_; }

  // Each as_* throws Error("json: expected <type>, found <type>") on mismatch.
  bool as_bool() const;
  double as_number() const;
  int64_t as_int() const;  // also throws unless the number is integral and fits int64
  const std::string& as_string() const;
  const Array& as_array() const;
  const Object& as_object() const;

  // Object lookup (linear: documents here are small or iterated in order).
  bool has(const std::string& key) const { return find(key) != nullptr; }
  const Value& at(const std::string& key) const;  // Error("json: missing key 'k'")
  const Value* find(const std::string& key) const;  // nullptr if absent or not an object

 private:
  Type type_ = Type::Null;
  bool bool_ = false;
  bool exact_int_ = false;  // int_ holds the exact value of an integer literal
  int64_t int_ = 0;
  double number_ = 0.0;
  std::string string_;
  Array array_;
  Object object_;
};

const char* type_name(Value::Type type);

Value parse(std::string_view text);
// Error messages start with the path; a file that cannot be read throws
// OsError("cannot open <path>: <strerror>").
Value parse_file(const std::string& path);

}  // namespace shortrt::json
