// Generates from token ids with the shortrt C++ API alone (no Python):
//
//   generate_ids CKPT_DIR [--dtype fp32|bf16|int8|int4] [--threads N] [--max-new-tokens N]
//                [--temperature T] [--top-k K] [--top-p P] [--seed S] [--skip I,J,...] ID [ID ...]
//
// Prints the generated ids on one line, separated by spaces. Errors go to
// stderr with exit status 1.
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "shortrt/engine.h"

namespace {

int usage() {
  std::cerr << "usage: generate_ids CKPT_DIR [--dtype fp32|bf16|int8|int4] [--threads N] [--max-new-tokens N]\n"
               "                    [--temperature T] [--top-k K] [--top-p P] [--seed S] [--skip I,J,...] ID [ID ...]\n";
  return 2;
}

int to_int(const std::string& s, const std::string& what) {
  size_t used = 0;
  int v = 0;
  try {
    v = std::stoi(s, &used);
  } catch (const std::exception&) {
    used = 0;  // std::stoi's own message is just "stoi"
  }
  if (used == 0 || used != s.size()) throw std::invalid_argument(what + ": not an integer: '" + s + "'");
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return usage();
  shortrt::EngineOptions engine_options;
  shortrt::GenerationOptions gen;
  std::vector<int> prompt;
  try {
    for (int i = 2; i < argc; ++i) {
      std::string arg = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
        return argv[++i];
      };
      if (arg == "--dtype") engine_options.dtype = value();
      else if (arg == "--threads") engine_options.threads = to_int(value(), arg);
      else if (arg == "--max-new-tokens") gen.max_new_tokens = to_int(value(), arg);
      else if (arg == "--temperature") gen.temperature = std::stof(value());
      else if (arg == "--top-k") gen.top_k = to_int(value(), arg);
      else if (arg == "--top-p") gen.top_p = std::stof(value());
      else if (arg == "--seed") gen.seed = std::stoull(value());
      else if (arg == "--skip") {
        std::stringstream list(value());
        for (std::string item; std::getline(list, item, ',');) engine_options.skip_layers.push_back(to_int(item, arg));
      } else if (arg.rfind("--", 0) == 0) {
        std::cerr << "generate_ids: unknown option " << arg << "\n";
        return usage();
      } else {
        prompt.push_back(to_int(arg, "token id"));
      }
    }
    if (prompt.empty()) return usage();
    auto engine = shortrt::Engine::load(argv[1], engine_options);
    auto out = engine->generate({prompt}, gen);
    for (size_t i = 0; i < out[0].size(); ++i) std::cout << (i ? " " : "") << out[0][i];
    std::cout << "\n";
  } catch (const std::exception& e) {
    std::cerr << "generate_ids: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
