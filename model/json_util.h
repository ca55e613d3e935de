// Internal JSON helpers of pd_model (config.json, safetensors headers and
// index files). Not part of the public API: only pd_model's .cc files include
// this header, which keeps Boost.JSON a private dependency.
#ifndef PD_MODEL_JSON_UTIL_H_
#define PD_MODEL_JSON_UTIL_H_

#include <string>

#include <boost/json.hpp>

#include "absl/strings/string_view.h"

namespace pd::model::internal {

// "null", "bool", "integer", "number", "string", "array" or "object".
const char* JsonKindName(const boost::json::value& v);

// Serialises `v` with two-space indentation (objects keep their insertion
// order). Doubles are written in their shortest round-tripping decimal form
// ("1e-06", "2.5"), not Boost's "2.5E0". Non-finite doubles are written as null.
std::string PrettyJson(const boost::json::value& v);

// A double whose shortest decimal form is the shortest form of `f`, so that
// writing it and parsing it back as a float yields `f` exactly (1e-6f is written
// as 1e-06, not 9.99999997475242708e-07).
double FloatForJson(float f);

inline boost::json::string_view ToJsonView(absl::string_view s) { return {s.data(), s.size()}; }
inline absl::string_view ToAbslView(boost::json::string_view s) { return {s.data(), s.size()}; }

}  // namespace pd::model::internal

#endif  // PD_MODEL_JSON_UTIL_H_
