// Reading and validating a checkpoint's config.json into shortrt::ModelConfig.
#pragma once

#include <string>

#include "shortrt/engine.h"

namespace shortrt {
namespace json { class Value; }

// Validates every field the runtime depends on; an unsupported architecture,
// activation, rope type or contradictory size throws Error naming the field.
ModelConfig parse_config(const json::Value& root);
ModelConfig load_config(const std::string& checkpoint_dir);  // <dir>/config.json

}  // namespace shortrt
