#include "weight_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <stdexcept>

#include "../json.hpp"

namespace megafusion::lib {

namespace {

constexpr const char* kMetaKey = "megafusion.aoti_weights";  // export/aoti_weights.py _META_KEY
constexpr uint64_t kMaxHeader = 100'000'000;                 // safetensors' own limit on the header

[[noreturn]] void bad(const std::string& why) { throw std::runtime_error(why); }

// A non-negative integer of JSON (a Python int), below 2^53 (doubles hold those exactly).
uint64_t count(const mfjson::Value& v, const std::string& what) {
  if (v.kind != mfjson::Value::Number || !v.integer || v.num < 0 || v.num > 9007199254740992.0)
    bad(what + " is " + (v.kind == mfjson::Value::Number ? v.literal : v.kind_name()) +
        ", expected a non-negative integer");
  return static_cast<uint64_t>(v.num);
}

std::vector<int64_t> int_list(const mfjson::Value& v, const std::string& what) {
  if (v.kind != mfjson::Value::Array) bad(what + " is " + v.kind_name() + ", expected an array");
  std::vector<int64_t> out;
  for (const auto& x : v.arr) out.push_back(static_cast<int64_t>(count(x, what + " item")));
  return out;
}

uint64_t numel(const std::vector<int64_t>& shape, const std::string& name) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d != 0 && n > (uint64_t{1} << 53) / static_cast<uint64_t>(d)) bad("tensor " + name + " is too large");
    n *= static_cast<uint64_t>(d);
  }
  return n;
}

void read_exactly(int fd, char* out, size_t n, uint64_t at) {
  while (n > 0) {
    const ssize_t got = ::pread(fd, out, n, static_cast<off_t>(at));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) bad(std::string("cannot be read (") + std::strerror(errno) + ")");
    if (got == 0) bad("ends early");
    out += got, n -= static_cast<size_t>(got), at += static_cast<uint64_t>(got);
  }
}

// The "layout" of megafusion's metadata entry, checked against the tensors it reshapes: the strided view of
// each stays inside the flat tensor stored for it.
void apply_layout(const mfjson::Value& layout, std::vector<WeightRecord>& records) {
  if (layout.kind != mfjson::Value::Object) bad("its metadata layout is " + layout.kind_name() + ", expected an object");
  std::map<std::string, WeightRecord*> by_name;
  for (WeightRecord& r : records) by_name[r.name] = &r;
  for (const auto& [name, v] : layout.obj) {
    auto it = by_name.find(name);
    if (it == by_name.end()) bad("its metadata lays out " + name + ", which the file does not hold");
    if (v.kind != mfjson::Value::Array || v.arr.size() != 2) bad("the layout of " + name + " is not [shape, strides]");
    WeightRecord& r = *it->second;
    std::vector<int64_t> shape = int_list(v.arr[0], "the layout shape of " + name);
    std::vector<int64_t> strides = int_list(v.arr[1], "the layout strides of " + name);
    const uint64_t n = numel(shape, name);
    if (strides.size() != shape.size() || n != r.bytes / r.element_size)
      bad("the layout of " + name + " does not fit the " + std::to_string(r.bytes / r.element_size) +
          " elements stored for it");
    uint64_t last = 0;  // the largest element offset the view addresses
    for (size_t i = 0; i < shape.size(); ++i)
      if (shape[i] > 0) last += static_cast<uint64_t>(shape[i] - 1) * static_cast<uint64_t>(strides[i]);
    if (n > 0 && last >= n) bad("the layout of " + name + " addresses elements past the " + std::to_string(n) + " stored");
    r.shape = std::move(shape);
    r.strides = std::move(strides);
  }
}

}  // namespace

int weight_element_size(const std::string& dtype) {
  static const std::map<std::string, int> sizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"I64", 8},
      {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

std::vector<WeightRecord> read_weight_index(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) bad(std::string("cannot be opened (") + std::strerror(errno) + ")");
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) bad("is not a regular file");
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) bad("is " + std::to_string(size) + " bytes, shorter than a safetensors header");
  unsigned char le[8];
  read_exactly(fd, reinterpret_cast<char*>(le), 8, 0);
  uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = header << 8 | le[i];
  if (header > kMaxHeader || header > size - 8)
    bad("declares a header of " + std::to_string(header) + " bytes in a file of " + std::to_string(size));
  std::string text(header, '\0');
  read_exactly(fd, text.data(), header, 8);
  mfjson::Value h;
  try {
    h = mfjson::parse(text);
  } catch (const std::exception& e) {
    bad(std::string("has a header that is not JSON (") + e.what() + ")");
  }
  if (h.kind != mfjson::Value::Object) bad("has a header that is " + h.kind_name() + ", expected an object");

  std::vector<WeightRecord> records;
  const uint64_t data = 8 + header, data_size = size - data;
  for (const auto& [name, v] : h.obj) {
    if (name == "__metadata__") continue;
    if (v.kind != mfjson::Value::Object || !v.has("dtype") || !v.has("shape") || !v.has("data_offsets"))
      bad("tensor " + name + " lacks dtype, shape or data_offsets");
    WeightRecord r;
    r.name = name;
    r.dtype = v["dtype"].kind == mfjson::Value::String ? v["dtype"].str : v["dtype"].kind_name();
    r.element_size = weight_element_size(r.dtype);
    if (r.element_size == 0) bad("tensor " + name + " has dtype " + r.dtype + ", which this reader does not know");
    r.shape = int_list(v["shape"], "the shape of " + name);
    const mfjson::Value& o = v["data_offsets"];
    if (o.kind != mfjson::Value::Array || o.arr.size() != 2) bad("the data_offsets of " + name + " are not [begin, end]");
    const uint64_t begin = count(o.arr[0], "the data offset of " + name), end = count(o.arr[1], "the data end of " + name);
    if (begin > end || end > data_size)
      bad("tensor " + name + " lies at bytes [" + std::to_string(begin) + ", " + std::to_string(end) +
          ") of data " + std::to_string(data_size) + " bytes long");
    r.offset = data + begin;
    r.bytes = end - begin;
    if (numel(r.shape, name) * static_cast<uint64_t>(r.element_size) != r.bytes)
      bad("tensor " + name + " holds " + std::to_string(r.bytes) + " bytes, not what its dtype " + r.dtype +
          " and shape take");
    records.push_back(std::move(r));
  }
  // safetensors' data is the tensors back to back, nothing between or after them.
  std::sort(records.begin(), records.end(), [](const WeightRecord& a, const WeightRecord& b) { return a.offset < b.offset; });
  uint64_t at = data;
  for (const WeightRecord& r : records) {
    if (r.offset != at) bad("tensor " + r.name + " does not start where the one before it ends");
    at += r.bytes;
  }
  if (at != size) bad("holds " + std::to_string(size - at) + " bytes after its last tensor");

  // megafusion's metadata: its format, and the strides of tensors stored flat.
  std::string found = "none";
  mfjson::Value meta;
  if (h.has("__metadata__") && h["__metadata__"].has(kMetaKey) &&
      h["__metadata__"][kMetaKey].kind == mfjson::Value::String) {
    try {
      meta = mfjson::parse(h["__metadata__"][kMetaKey].str);
    } catch (const std::exception&) {
      found = "metadata that is not JSON";
    }
    if (meta.has("format")) found = meta["format"].kind == mfjson::Value::Number ? meta["format"].literal : "?";
  }
  if (found != std::to_string(kWeightFileFormat))
    bad("is not a megafusion weight file of format " + std::to_string(kWeightFileFormat) + " (found " + found + ")");
  if (meta.has("layout")) apply_layout(meta["layout"], records);
  return records;
}

}  // namespace megafusion::lib
