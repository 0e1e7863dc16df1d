// A minimal JSON reader (test vectors, engine manifests) (objects, arrays, numbers, strings, booleans, null).
// Numbers are parsed with strtod, which rounds correctly, so Python's repr of a float comes back exactly.
#ifndef MEGAFUSION_SRC_JSON_HPP_
#define MEGAFUSION_SRC_JSON_HPP_

#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace mfjson {

struct Value {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool b = false;
  double num = 0.0;
  std::string str;
  std::vector<Value> arr;
  std::map<std::string, Value> obj;

  bool is_null() const { return kind == Null; }
  const Value& operator[](const std::string& key) const {
    auto it = obj.find(key);
    if (kind != Object || it == obj.end()) throw std::runtime_error("JSON: no key '" + key + "'");
    return it->second;
  }
  bool has(const std::string& key) const { return kind == Object && obj.count(key) > 0; }
  const Value& operator[](size_t i) const { return arr.at(i); }
  size_t size() const { return kind == Array ? arr.size() : obj.size(); }
  int as_int() const { return static_cast<int>(num); }
};

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Value parse() {
    Value v = value();
    ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& why) {
    throw std::runtime_error("JSON: " + why + " at offset " + std::to_string(i_));
  }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\t' || s_[i_] == '\r')) ++i_;
  }
  bool lit(const char* w) {
    const std::string word(w);
    if (s_.compare(i_, word.size(), word) == 0) {
      i_ += word.size();
      return true;
    }
    return false;
  }
  Value value() {
    ws();
    if (i_ >= s_.size()) fail("unexpected end");
    Value v;
    const char c = s_[i_];
    if (c == '{') {
      v.kind = Value::Object;
      ++i_;
      ws();
      if (s_[i_] == '}') { ++i_; return v; }
      while (true) {
        ws();
        std::string key = string();
        ws();
        if (s_[i_++] != ':') fail("expected ':'");
        v.obj[key] = value();
        ws();
        if (s_[i_] == ',') { ++i_; continue; }
        if (s_[i_++] != '}') fail("expected '}'");
        return v;
      }
    }
    if (c == '[') {
      v.kind = Value::Array;
      ++i_;
      ws();
      if (s_[i_] == ']') { ++i_; return v; }
      while (true) {
        v.arr.push_back(value());
        ws();
        if (s_[i_] == ',') { ++i_; continue; }
        if (s_[i_++] != ']') fail("expected ']'");
        return v;
      }
    }
    if (c == '"') {
      v.kind = Value::String;
      v.str = string();
      return v;
    }
    if (lit("true")) { v.kind = Value::Bool; v.b = true; return v; }
    if (lit("false")) { v.kind = Value::Bool; return v; }
    if (lit("null")) return v;
    if (lit("NaN")) { v.kind = Value::Number; v.num = std::nan(""); return v; }
    char* end = nullptr;
    v.num = std::strtod(s_.c_str() + i_, &end);
    if (end == s_.c_str() + i_) fail("bad value");
    i_ = static_cast<size_t>(end - s_.c_str());
    v.kind = Value::Number;
    return v;
  }
  std::string string() {
    if (s_[i_++] != '"') fail("expected string");
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c == '\\') {
        const char e = s_[i_++];
        switch (e) {
          case 'n': out += '\n'; break;
          case 't': out += '\t'; break;
          case 'u': {  // the vectors are ASCII; keep BMP code points below 0x80 only
            const int code = std::stoi(s_.substr(i_, 4), nullptr, 16);
            i_ += 4;
            out += code < 0x80 ? static_cast<char>(code) : '?';
            break;
          }
          default: out += e;
        }
      } else {
        out += c;
      }
    }
    ++i_;
    return out;
  }
};

inline Value parse(const std::string& text) { return Parser(text).parse(); }

}  // namespace mfjson

#endif  // MEGAFUSION_SRC_JSON_HPP_
