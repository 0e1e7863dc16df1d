// A minimal strict JSON reader (test vectors, engine manifests) (objects, arrays, numbers, strings, booleans,
// null, and Python's NaN, Infinity and -Infinity), and `python_dumps`, which writes a value back exactly as
// Python's json.dumps(value, sort_keys=True) does (the engine manifest's key digests are sha256 over that).
//
// The reader refuses what Python's json.loads refuses (bad numbers, control characters and bad escapes in
// strings, invalid UTF-8, trailing commas) and nesting deeper than kMaxDepth, with an error naming the offset,
// never a crash. Numbers keep whether they were written as integers (Python ints) and their literal text, so
// integers of any size come back as written; floats are parsed correctly rounded and locale-independently.
#ifndef MEGAFUSION_SRC_JSON_HPP_
#define MEGAFUSION_SRC_JSON_HPP_

#include <algorithm>
#include <charconv>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace mfjson {

// Containers nested deeper than this are refused (engine manifests nest 6 deep, the test vectors 5).
constexpr int kMaxDepth = 64;

struct Value {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool b = false;
  double num = 0.0;
  bool integer = false;  // a Number written without fraction or exponent (a Python int)
  std::string literal;   // a Number's text as written ("NaN", "Infinity", "-Infinity" included)
  std::string str;       // UTF-8
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
  // The number as an int; throws when it is not a number with an integral value in int's range.
  int as_int() const {
    if (kind != Number || !(num == std::floor(num)) || num < INT_MIN || num > INT_MAX)
      throw std::runtime_error("JSON: expected an integer, got " + (kind == Number ? literal : kind_name()));
    return static_cast<int>(num);
  }
  std::string kind_name() const {
    static const char* names[] = {"null", "a boolean", "a number", "a string", "an array", "an object"};
    return names[kind];
  }
};

class Parser {
 public:
  explicit Parser(const std::string& text, int max_depth = kMaxDepth) : s_(text), max_depth_(max_depth) {}

  Value parse() {
    Value v = value(0);
    ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  const int max_depth_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error("JSON: " + why + " at offset " + std::to_string(i_));
  }
  // The next character, '\0' at the end (a NUL byte inside the text is refused wherever it is read).
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void expect(char c) {
    if (i_ >= s_.size() || s_[i_] != c) fail(std::string("expected '") + c + "'");
    ++i_;
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
  static bool digit(char c) { return c >= '0' && c <= '9'; }

  // `depth`: containers around this value.
  Value value(int depth) {
    ws();
    if (i_ >= s_.size()) fail("unexpected end");
    Value v;
    const char c = s_[i_];
    if (c == '{' || c == '[') {
      if (depth >= max_depth_) fail("nesting deeper than " + std::to_string(max_depth_) + " levels");
      ++i_;
      ws();
      if (c == '{') {
        v.kind = Value::Object;
        if (peek() == '}') return ++i_, v;
        while (true) {
          ws();
          if (peek() != '"') fail("expected a string key");
          std::string key = string();
          ws();
          expect(':');
          v.obj[key] = value(depth + 1);  // a repeated key: the last wins, as in Python
          ws();
          if (peek() == ',') { ++i_; continue; }
          expect('}');
          return v;
        }
      }
      v.kind = Value::Array;
      if (peek() == ']') return ++i_, v;
      while (true) {
        v.arr.push_back(value(depth + 1));
        ws();
        if (peek() == ',') { ++i_; continue; }
        expect(']');
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
    return number();
  }

  // JSON's number grammar, and Python's NaN, Infinity and -Infinity.
  Value number() {
    Value v;
    v.kind = Value::Number;
    const size_t start = i_;
    if (lit("NaN")) return v.num = std::nan(""), v.literal = "NaN", v;
    if (lit("Infinity")) return v.num = HUGE_VAL, v.literal = "Infinity", v;
    if (lit("-Infinity")) return v.num = -HUGE_VAL, v.literal = "-Infinity", v;
    if (peek() == '-') ++i_;
    if (peek() == '0') {
      ++i_;
    } else if (digit(peek())) {
      while (digit(peek())) ++i_;
    } else {
      i_ = start;
      fail("bad value");
    }
    v.integer = true;
    if (peek() == '.') {
      ++i_;
      if (!digit(peek())) fail("bad number");
      while (digit(peek())) ++i_;
      v.integer = false;
    }
    if (peek() == 'e' || peek() == 'E') {
      ++i_;
      if (peek() == '+' || peek() == '-') ++i_;
      if (!digit(peek())) fail("bad number");
      while (digit(peek())) ++i_;
      v.integer = false;
    }
    v.literal = s_.substr(start, i_ - start);
    v.num = to_double(v.literal);
    return v;
  }

  // Correctly rounded, as Python's float(): beyond the largest double gives +-inf, below the smallest +-0.
  static double to_double(const std::string& t) {
    double d = 0;
    const char* b = t.data() + (t[0] == '-');
    auto r = std::from_chars(b, t.data() + t.size(), d);
    if (r.ec == std::errc::result_out_of_range) {
      // Out of range either way: the decimal order of magnitude tells overflow from underflow.
      const size_t e = t.find_first_of("eE");
      const std::string mant = t.substr(b - t.data(), e == std::string::npos ? std::string::npos : e - (b - t.data()));
      long long order = e == std::string::npos ? 0 : std::strtoll(t.c_str() + e + 1, nullptr, 10);
      const size_t dot = mant.find('.');
      const std::string whole = mant.substr(0, dot), frac = dot == std::string::npos ? "" : mant.substr(dot + 1);
      const size_t nz = whole.find_first_not_of('0');
      if (nz != std::string::npos) order += static_cast<long long>(whole.size() - nz);
      else order -= static_cast<long long>(std::min(frac.find_first_not_of('0'), frac.size()));
      d = order > 0 ? HUGE_VAL : 0.0;
    } else if (r.ec != std::errc()) {
      throw std::runtime_error("JSON: bad number " + t);
    }
    return t[0] == '-' ? -d : d;
  }

  unsigned hex4() {
    if (s_.size() - i_ < 4) fail("truncated \\u escape");
    unsigned code = 0;
    for (int k = 0; k < 4; ++k) {
      const char h = s_[i_++];
      code <<= 4;
      if (h >= '0' && h <= '9') code |= h - '0';
      else if (h >= 'a' && h <= 'f') code |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') code |= h - 'A' + 10;
      else fail("bad \\u escape");
    }
    return code;
  }

  // Appends code point `c` as UTF-8 (a lone surrogate, which Python keeps, as its 3-byte form).
  static void put_utf8(std::string& out, unsigned c) {
    if (c < 0x80) {
      out += static_cast<char>(c);
    } else if (c < 0x800) {
      out += static_cast<char>(0xC0 | (c >> 6));
      out += static_cast<char>(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
      out += static_cast<char>(0xE0 | (c >> 12));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (c & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (c >> 18));
      out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (c & 0x3F));
    }
  }

  // One UTF-8 sequence at i_ (Python reads the file as strict UTF-8: no overlong forms, no surrogates).
  void raw_utf8(std::string& out) {
    const unsigned char c0 = static_cast<unsigned char>(s_[i_]);
    int n = c0 >= 0xF0 && c0 <= 0xF4 ? 3 : c0 >= 0xE0 ? 2 : c0 >= 0xC2 && c0 < 0xE0 ? 1 : -1;
    if (c0 >= 0xF5) n = -1;
    if (n < 0 || s_.size() - i_ <= static_cast<size_t>(n)) fail("invalid UTF-8");
    unsigned code = c0 & (0x3F >> n);
    for (int k = 1; k <= n; ++k) {
      const unsigned char ck = static_cast<unsigned char>(s_[i_ + k]);
      if ((ck & 0xC0) != 0x80) fail("invalid UTF-8");
      code = (code << 6) | (ck & 0x3F);
    }
    if ((n == 2 && (code < 0x800 || (code >= 0xD800 && code < 0xE000))) ||
        (n == 3 && (code < 0x10000 || code > 0x10FFFF)))
      fail("invalid UTF-8");
    out.append(s_, i_, n + 1);
    i_ += n + 1;
  }

  std::string string() {
    expect('"');
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      const char c = s_[i_];
      if (c == '"') { ++i_; return out; }
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (static_cast<unsigned char>(c) >= 0x80) { raw_utf8(out); continue; }
      ++i_;
      if (c != '\\') { out += c; continue; }
      if (i_ >= s_.size()) fail("unterminated string");
      const char e = s_[i_++];
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
          unsigned code = hex4();
          // A high surrogate followed by an escaped low one is one code point (as Python reads it).
          if (code >= 0xD800 && code < 0xDC00 && s_.compare(i_, 2, "\\u") == 0) {
            const size_t save = i_;
            i_ += 2;
            const unsigned low = hex4();
            if (low >= 0xDC00 && low < 0xE000) code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
            else i_ = save;
          }
          put_utf8(out, code);
          break;
        }
        default: --i_; fail(std::string("bad escape '\\") + e + "'");
      }
    }
  }
};

inline Value parse(const std::string& text) { return Parser(text).parse(); }

// ------------------------------------------------------------------------------------------------ writing

namespace detail {

// repr(float) in Python: the shortest digits that read back to the same double; positional notation when
// the decimal exponent is in [-4, 16), else d.ddde+XX (at least two exponent digits); json writes NaN,
// Infinity and -Infinity for the non-finite ones.
inline std::string python_float_repr(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string sci(buf, r.ptr);  // "-1.2345e+02"
  std::string out;
  if (sci[0] == '-') out = "-", sci.erase(0, 1);
  const size_t e = sci.find('e');
  std::string digits = sci.substr(0, e);
  if (digits.size() > 1) digits.erase(1, 1);  // drop the point: "12345"
  const int exp10 = std::atoi(sci.c_str() + e + 1);
  const int decpt = exp10 + 1;  // digits * 10^(decpt - len)
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) {
      out += "0." + std::string(-decpt, '0') + digits;
    } else if (static_cast<size_t>(decpt) >= digits.size()) {
      out += digits + std::string(decpt - digits.size(), '0') + ".0";
    } else {
      out += digits.substr(0, decpt) + "." + digits.substr(decpt);
    }
    return out;
  }
  out += digits.substr(0, 1);
  if (digits.size() > 1) out += "." + digits.substr(1);
  char ebuf[16];
  std::snprintf(ebuf, sizeof ebuf, "e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
  return out + ebuf;
}

// A Python int's str() from its JSON literal ("-0" is 0).
inline std::string python_int(const std::string& literal) { return literal == "-0" ? "0" : literal; }

// A JSON string as json.dumps writes it with ensure_ascii: \" \\ \b \f \n \r \t, other characters outside
// ' '..'~' as \u00XX, and code points above U+FFFF as surrogate pairs. `s` is UTF-8 (as the reader keeps it).
inline void python_string(std::string& out, const std::string& s) {
  static const char* hex = "0123456789abcdef";
  auto u = [&](unsigned c) {
    out += "\\u";
    for (int k = 12; k >= 0; k -= 4) out += hex[(c >> k) & 0xF];
  };
  out += '"';
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    unsigned code = c;
    int n = 0;
    if (c >= 0xF0) n = 3, code = c & 0x07;
    else if (c >= 0xE0) n = 2, code = c & 0x0F;
    else if (c >= 0xC0) n = 1, code = c & 0x1F;
    else if (c >= 0x80) throw std::runtime_error("JSON: string is not UTF-8");
    if (i + n >= s.size()) throw std::runtime_error("JSON: string is not UTF-8");
    for (int k = 1; k <= n; ++k) code = (code << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    i += n + 1;
    switch (code) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (code >= 0x20 && code < 0x7F) {
          out += static_cast<char>(code);
        } else if (code < 0x10000) {
          u(code);
        } else {
          code -= 0x10000;
          u(0xD800 + (code >> 10));
          u(0xDC00 + (code & 0x3FF));
        }
    }
  }
  out += '"';
}

inline void python_dumps(std::string& out, const Value& v) {
  switch (v.kind) {
    case Value::Null: out += "null"; return;
    case Value::Bool: out += v.b ? "true" : "false"; return;
    case Value::Number:
      if (!v.integer) out += python_float_repr(v.num);
      else out += v.literal.empty() ? std::to_string(static_cast<long long>(v.num)) : python_int(v.literal);
      return;
    case Value::String: python_string(out, v.str); return;
    case Value::Array:
      out += '[';
      for (size_t i = 0; i < v.arr.size(); ++i) {
        if (i) out += ", ";
        python_dumps(out, v.arr[i]);
      }
      out += ']';
      return;
    case Value::Object: {
      out += '{';
      bool first = true;
      for (const auto& [k, x] : v.obj) {  // std::map: keys in byte order, which for UTF-8 is code point order
        if (!first) out += ", ";
        first = false;
        python_string(out, k);
        out += ": ";
        python_dumps(out, x);
      }
      out += '}';
      return;
    }
  }
}

}  // namespace detail

// json.dumps(v, sort_keys=True) in Python: separators ", " and ": ", keys sorted, ensure_ascii, ints as
// written, floats as repr() writes them. A Number built in C++ (no literal) is written as a float unless
// `integer` is set, then from its value.
inline std::string python_dumps(const Value& v) {
  std::string out;
  detail::python_dumps(out, v);
  return out;
}

}  // namespace mfjson

#endif  // MEGAFUSION_SRC_JSON_HPP_
