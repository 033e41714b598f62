// libFuzzer harness for the safetensors reader: the input is a whole file
// image, handed to parse_safetensors() exactly as SafetensorsFile hands it
// the mapped file. Built with -fsanitize=fuzzer,address,undefined by
// fuzz/run.sh; a crash, sanitizer report or broken invariant below is a bug.
//
// Whether the reader agrees with the safetensors library cannot be checked
// here (no Python); tests/test_safetensors.py runs the corpus and every
// regression in fuzz/regressions/ through both.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>

#include "safetensors.h"

namespace {

[[noreturn]] void broken(const char* what, const std::string& detail) {
  std::fprintf(stderr, "fuzz_safetensors: invariant broken: %s (%s)\n", what, detail.c_str());
  std::abort();
}

// What an accepted file must satisfy: the tensors tile the data section
// exactly, in order, each the size its dtype and shape say, names unique.
void check_accepted(const uint8_t* data, size_t size, const shortrt::SafetensorsContents& c) {
  size_t expect = 8 + c.header_size;
  std::set<std::string> names;
  unsigned sum = 0;
  for (const shortrt::TensorView& t : c.tensors) {
    if (t.offset != expect) broken("tensors do not tile the data section", t.name);
    if (t.data != data + t.offset) broken("data pointer is not at the offset", t.name);
    const uint64_t bits = static_cast<uint64_t>(t.numel()) * shortrt::dtype_bits(t.dtype);
    if (bits / 8 != t.nbytes || bits % 8 != 0) broken("nbytes differs from numel * bits / 8", t.name);
    if (!names.insert(t.name).second) broken("tensor name appears twice", t.name);
    for (size_t i = 0; i < t.nbytes; ++i) sum += t.data[i];  // ASan reports any read outside the input
    expect += t.nbytes;
  }
  if (expect != size) broken("bytes after the last tensor", std::to_string(size - expect));
  if (sum == 0xdeadbeef) std::puts("");  // keep the reads
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    check_accepted(data, size, shortrt::parse_safetensors(data, size, "<fuzz>"));
  } catch (const shortrt::Error& e) {
    // Refusals are one line that starts with the file's name.
    if (std::strchr(e.what(), '\n') || std::strncmp(e.what(), "<fuzz>: ", 8) != 0) broken("bad message", e.what());
  }
  return 0;
}
