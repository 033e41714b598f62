// Errors the runtime throws for bad input. Every message names the file or
// value at fault and the problem, so the user can fix it without a debugger.
#pragma once

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace shortrt {

// Bad input (corrupt file, malformed JSON, wrong shape, ...). The Python
// binding maps it to shortrt._C.FormatError, a ValueError.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An operating-system call on a path failed (missing file, permission, ...).
// Keeps errno so the Python binding can raise the matching OSError subclass
// (ENOENT -> FileNotFoundError).
struct OsError : Error {
  OsError(const std::string& what, int errno_value) : Error(what), errno_value(errno_value) {}
  int errno_value;
};

// "<action> <path>: <strerror(errno)>", e.g. "cannot open x: No such file or
// directory". Call right after the failing system call, while errno is its.
inline OsError os_error(const std::string& action, const std::string& path) {
  int saved = errno;
  return OsError(action + " " + path + ": " + std::strerror(saved), saved);
}

}  // namespace shortrt
