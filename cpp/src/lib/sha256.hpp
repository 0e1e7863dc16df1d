// SHA-256 of a file (FIPS 180-4), to verify engine files against the manifest without OpenSSL.
#ifndef MEGAFUSION_LIB_SHA256_HPP_
#define MEGAFUSION_LIB_SHA256_HPP_

#include <string>

namespace megafusion::lib {

// Lower-case hex digest; throws std::runtime_error if the file cannot be read.
std::string sha256_file(const std::string& path);

// Of what is left to read from an open file descriptor; throws std::runtime_error (the errno text) on a read
// error, e.g. EISDIR.
std::string sha256_fd(int fd);

// Of a byte string (tests).
std::string sha256_bytes(const std::string& data);

// Whether blocks go through the CPU's SHA extensions (x86 SHA-NI) rather than the portable code.
bool sha256_accelerated();

// Tests: true makes every later hash use the portable code (not thread-safe; set before hashing).
void sha256_portable_only(bool on);

}  // namespace megafusion::lib

#endif  // MEGAFUSION_LIB_SHA256_HPP_
