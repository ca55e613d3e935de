#include "model/json_util.h"

#include <charconv>
#include <cmath>
#include <cstdlib>

namespace pd::model::internal {
namespace {

void AppendIndent(int depth, std::string* out) { out->append(size_t(2 * depth), ' '); }

void AppendDouble(double d, std::string* out) {
  if (!std::isfinite(d)) {
    out->append("null");
    return;
  }
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), d);
  out->append(buf, r.ptr);
}

void AppendPretty(const boost::json::value& v, int depth, std::string* out) {
  switch (v.kind()) {
    case boost::json::kind::object: {
      const boost::json::object& o = v.get_object();
      if (o.empty()) {
        out->append("{}");
        return;
      }
      out->append("{\n");
      size_t i = 0;
      for (const auto& kv : o) {
        AppendIndent(depth + 1, out);
        out->append(boost::json::serialize(boost::json::value(kv.key())));
        out->append(": ");
        AppendPretty(kv.value(), depth + 1, out);
        out->append(++i < o.size() ? ",\n" : "\n");
      }
      AppendIndent(depth, out);
      out->push_back('}');
      return;
    }
    case boost::json::kind::array: {
      const boost::json::array& a = v.get_array();
      // Arrays of scalars stay on one line ("[128, 128]").
      bool flat = true;
      for (const auto& e : a) flat = flat && !e.is_object() && !e.is_array();
      if (a.empty() || flat) {
        out->push_back('[');
        for (size_t i = 0; i < a.size(); ++i) {
          if (i) out->append(", ");
          AppendPretty(a[i], depth, out);
        }
        out->push_back(']');
        return;
      }
      out->append("[\n");
      for (size_t i = 0; i < a.size(); ++i) {
        AppendIndent(depth + 1, out);
        AppendPretty(a[i], depth + 1, out);
        out->append(i + 1 < a.size() ? ",\n" : "\n");
      }
      AppendIndent(depth, out);
      out->push_back(']');
      return;
    }
    case boost::json::kind::double_:
      AppendDouble(v.get_double(), out);
      return;
    default:
      out->append(boost::json::serialize(v));
      return;
  }
}

}  // namespace

const char* JsonKindName(const boost::json::value& v) {
  switch (v.kind()) {
    case boost::json::kind::null: return "null";
    case boost::json::kind::bool_: return "bool";
    case boost::json::kind::int64:
    case boost::json::kind::uint64: return "integer";
    case boost::json::kind::double_: return "number";
    case boost::json::kind::string: return "string";
    case boost::json::kind::array: return "array";
    case boost::json::kind::object: return "object";
  }
  return "?";
}

std::string PrettyJson(const boost::json::value& v) {
  std::string out;
  AppendPretty(v, 0, &out);
  out.push_back('\n');
  return out;
}

double FloatForJson(float f) {
  if (!std::isfinite(f)) return double(f);
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf) - 1, f);
  *r.ptr = '\0';
  return std::strtod(buf, nullptr);
}

}  // namespace pd::model::internal
