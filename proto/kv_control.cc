#include "proto/kv_control.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <cstring>
#include <exception>
#include <iterator>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "proto/kv_control.capnp.h"

namespace pd::proto {
namespace {

namespace gen = ::pd::proto::capnp_gen;

// Reader limits for untrusted frames: a frame is at most kMaxFramePayload bytes,
// so the traversal limit (in 8-byte words) equals the largest frame; nesting of
// the schema is 3 levels.
constexpr uint64_t kTraversalLimitWords = kMaxFramePayload / 8;
constexpr int kNestingLimit = 8;
// Largest list the decoder accepts (page tables, layer offsets, chunk batches).
constexpr uint32_t kMaxListElements = 1u << 20;

capnp::Text::Reader TextOf(const std::string& s) { return capnp::Text::Reader(s.c_str(), s.size()); }
capnp::Data::Reader DataOf(const std::string& s) {
  return capnp::Data::Reader(reinterpret_cast<const kj::byte*>(s.data()), s.size());
}
std::string StringOf(capnp::Text::Reader t) { return std::string(t.cStr(), t.size()); }
std::string StringOf(capnp::Data::Reader d) {
  return std::string(reinterpret_cast<const char*>(d.begin()), d.size());
}

absl::Status CheckDtype(gen::Dtype d, const char* field) {
  if (uint16_t(d) > uint16_t(gen::Dtype::FP32)) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed control message: ", field, " has unknown dtype ", uint16_t(d)));
  }
  return absl::OkStatus();
}
absl::StatusOr<ObjectKind> KindOf(gen::ObjectKind k) {
  if (uint16_t(k) > uint16_t(gen::ObjectKind::SUMMARY)) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed control message: unknown object kind ", uint16_t(k)));
  }
  return ObjectKind(uint16_t(k));
}
absl::Status CheckListSize(uint32_t n, const char* field) {
  if (n > kMaxListElements) {
    return absl::InvalidArgumentError(absl::StrCat("malformed control message: ", field, " has ", n,
                                                   " elements, limit ", kMaxListElements));
  }
  return absl::OkStatus();
}

template <typename ListBuilder, typename T>
void FillList(ListBuilder b, const std::vector<T>& v) {
  for (size_t i = 0; i < v.size(); ++i) b.set(unsigned(i), v[i]);
}
template <typename T, typename ListReader>
absl::StatusOr<std::vector<T>> ReadList(ListReader r, const char* field) {
  if (absl::Status s = CheckListSize(r.size(), field); !s.ok()) return s;
  std::vector<T> v;
  v.reserve(r.size());
  for (auto x : r) v.push_back(T(x));
  return v;
}

void WriteLayout(gen::ObjectLayout::Builder b, const ObjectLayout& l) {
  b.setKind(gen::ObjectKind(uint16_t(l.kind)));
  b.setDtype(gen::Dtype(uint16_t(l.dtype)));
  b.setWidth(l.width);
  b.setScaleDtype(gen::Dtype(uint16_t(l.scale_dtype)));
  b.setScaleGroup(l.scale_group);
  b.setAuxDtype(gen::Dtype(uint16_t(l.aux_dtype)));
  b.setAuxWidth(l.aux_width);
  b.setUnitBytes(l.unit_bytes);
  b.setUnitTokens(l.unit_tokens);
  b.setPageBytes(l.page_bytes);
}

absl::StatusOr<ObjectLayout> ReadLayout(gen::ObjectLayout::Reader r) {
  ObjectLayout l;
  auto kind = KindOf(r.getKind());
  if (!kind.ok()) return kind.status();
  l.kind = *kind;
  for (auto [d, name] : {std::pair{r.getDtype(), "dtype"}, std::pair{r.getScaleDtype(), "scaleDtype"},
                         std::pair{r.getAuxDtype(), "auxDtype"}}) {
    if (absl::Status s = CheckDtype(d, name); !s.ok()) return s;
  }
  l.dtype = Dtype(uint16_t(r.getDtype()));
  l.width = r.getWidth();
  l.scale_dtype = Dtype(uint16_t(r.getScaleDtype()));
  l.scale_group = r.getScaleGroup();
  l.aux_dtype = Dtype(uint16_t(r.getAuxDtype()));
  l.aux_width = r.getAuxWidth();
  l.unit_bytes = r.getUnitBytes();
  l.unit_tokens = r.getUnitTokens();
  l.page_bytes = r.getPageBytes();
  return l;
}

bool ValidKind(ObjectKind k) { return uint8_t(k) <= uint8_t(ObjectKind::kSummary); }
bool ValidDtype(Dtype d) { return uint8_t(d) <= uint8_t(Dtype::kFp32); }

absl::Status Build(gen::ControlMessage::Builder root, const ControlMessage& msg) {
  return std::visit(
      [&](const auto& m) -> absl::Status {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, Manifest>) {
          auto b = root.initManifest();
          b.setRequestId(TextOf(m.request_id));
          b.setModelFingerprint(TextOf(m.model_fingerprint));
          b.setNumLayers(m.num_layers);
          b.setNumTokens(m.num_tokens);
          b.setPageTokens(m.page_tokens);
          auto objs = b.initObjects(unsigned(m.objects.size()));
          for (size_t i = 0; i < m.objects.size(); ++i) {
            const ObjectLayout& l = m.objects[i];
            if (!ValidKind(l.kind) || !ValidDtype(l.dtype) || !ValidDtype(l.scale_dtype) ||
                !ValidDtype(l.aux_dtype)) {
              return absl::InvalidArgumentError(
                  absl::StrCat("manifest object ", i, " has an out-of-range enum value"));
            }
            WriteLayout(objs[unsigned(i)], l);
          }
          b.setBackend(TextOf(m.backend));
          b.setSenderInfo(DataOf(m.sender_info));
          b.setMaxChunkBytes(m.max_chunk_bytes);
          b.setStaged(m.staged);
          b.setChecksum(m.checksum);
          FillList(b.initSourcePages(unsigned(m.source_pages.size())), m.source_pages);
          b.setSenderNode(TextOf(m.sender_node));
          b.setChecksumEvery(m.checksum_every);
        } else if constexpr (std::is_same_v<T, Accept>) {
          auto b = root.initAccept();
          b.setRequestId(TextOf(m.request_id));
          FillList(b.initPageTable(unsigned(m.page_table.size())), m.page_table);
          b.setReceiverInfo(DataOf(m.receiver_info));
          FillList(b.initMlaOffsets(unsigned(m.mla_offsets.size())), m.mla_offsets);
          FillList(b.initIndexOffsets(unsigned(m.index_offsets.size())), m.index_offsets);
          FillList(b.initSummaryOffsets(unsigned(m.summary_offsets.size())), m.summary_offsets);
          b.setStagingSlots(m.staging_slots);
          b.setSlotBytes(m.slot_bytes);
          b.setCreditBytes(m.credit_bytes);
          b.setCreditChunks(m.credit_chunks);
        } else if constexpr (std::is_same_v<T, ChunkBatch>) {
          auto list = root.initChunks(unsigned(m.chunks.size()));
          for (size_t i = 0; i < m.chunks.size(); ++i) {
            const ChunkHeader& h = m.chunks[i];
            if (!ValidKind(h.kind)) return absl::InvalidArgumentError("chunk header with a bad object kind");
            auto b = list[unsigned(i)];
            b.setChunkId(h.chunk_id);
            b.setLayer(h.layer);
            b.setKind(gen::ObjectKind(uint16_t(h.kind)));
            b.setTokenBegin(h.token_begin);
            b.setTokenEnd(h.token_end);
            b.setPageBegin(h.page_begin);
            b.setPageCount(h.page_count);
            b.setBytes(h.bytes);
            b.setChecksum(h.checksum);
            b.setAttempt(h.attempt);
            b.setSlot(h.slot);
          }
        } else if constexpr (std::is_same_v<T, AckBatch>) {
          auto b = root.initAcks();
          auto list = b.initAcks(unsigned(m.acks.size()));
          for (size_t i = 0; i < m.acks.size(); ++i) {
            list[unsigned(i)].setChunkId(m.acks[i].chunk_id);
            list[unsigned(i)].setOk(m.acks[i].ok);
          }
          b.setCreditBytes(m.credit_bytes);
          b.setCreditChunks(m.credit_chunks);
        } else if constexpr (std::is_same_v<T, LayerReady>) {
          root.initLayerReady().setLayer(m.layer);
        } else if constexpr (std::is_same_v<T, Done>) {
          auto b = root.initDone();
          b.setChunks(m.chunks);
          b.setBytes(m.bytes);
        } else if constexpr (std::is_same_v<T, Abort>) {
          auto b = root.initAbort();
          b.setCode(m.code);
          b.setMessage(TextOf(m.message));
        } else if constexpr (std::is_same_v<T, Heartbeat>) {
          root.initHeartbeat().setSeq(m.seq);
        } else {
          static_assert(std::is_same_v<T, Quiesced>);
          root.initQuiesced().setWrites(m.writes);
        }
        return absl::OkStatus();
      },
      msg);
}

absl::StatusOr<ControlMessage> Parse(gen::ControlMessage::Reader root) {
  switch (root.which()) {
    case gen::ControlMessage::MANIFEST: {
      auto r = root.getManifest();
      Manifest m;
      m.request_id = StringOf(r.getRequestId());
      m.model_fingerprint = StringOf(r.getModelFingerprint());
      m.num_layers = r.getNumLayers();
      m.num_tokens = r.getNumTokens();
      m.page_tokens = r.getPageTokens();
      auto objs = r.getObjects();
      if (objs.size() > 16) {
        return absl::InvalidArgumentError(
            absl::StrCat("malformed control message: manifest lists ", objs.size(), " objects"));
      }
      for (auto o : objs) {
        auto l = ReadLayout(o);
        if (!l.ok()) return l.status();
        m.objects.push_back(*l);
      }
      m.backend = StringOf(r.getBackend());
      m.sender_info = StringOf(r.getSenderInfo());
      m.max_chunk_bytes = r.getMaxChunkBytes();
      m.staged = r.getStaged();
      m.checksum = r.getChecksum();
      auto sp = ReadList<int32_t>(r.getSourcePages(), "sourcePages");
      if (!sp.ok()) return sp.status();
      m.source_pages = std::move(*sp);
      m.sender_node = StringOf(r.getSenderNode());
      m.checksum_every = r.getChecksumEvery();
      return ControlMessage(std::move(m));
    }
    case gen::ControlMessage::ACCEPT: {
      auto r = root.getAccept();
      Accept a;
      a.request_id = StringOf(r.getRequestId());
      auto pt = ReadList<int32_t>(r.getPageTable(), "pageTable");
      if (!pt.ok()) return pt.status();
      a.page_table = std::move(*pt);
      a.receiver_info = StringOf(r.getReceiverInfo());
      auto mo = ReadList<uint64_t>(r.getMlaOffsets(), "mlaOffsets");
      if (!mo.ok()) return mo.status();
      auto io = ReadList<uint64_t>(r.getIndexOffsets(), "indexOffsets");
      if (!io.ok()) return io.status();
      auto so = ReadList<uint64_t>(r.getSummaryOffsets(), "summaryOffsets");
      if (!so.ok()) return so.status();
      a.mla_offsets = std::move(*mo);
      a.index_offsets = std::move(*io);
      a.summary_offsets = std::move(*so);
      a.staging_slots = r.getStagingSlots();
      a.slot_bytes = r.getSlotBytes();
      a.credit_bytes = r.getCreditBytes();
      a.credit_chunks = r.getCreditChunks();
      return ControlMessage(std::move(a));
    }
    case gen::ControlMessage::CHUNKS: {
      auto list = root.getChunks();
      if (absl::Status s = CheckListSize(list.size(), "chunks"); !s.ok()) return s;
      ChunkBatch batch;
      batch.chunks.reserve(list.size());
      for (auto r : list) {
        ChunkHeader h;
        h.chunk_id = r.getChunkId();
        h.layer = r.getLayer();
        auto kind = KindOf(r.getKind());
        if (!kind.ok()) return kind.status();
        h.kind = *kind;
        h.token_begin = r.getTokenBegin();
        h.token_end = r.getTokenEnd();
        h.page_begin = r.getPageBegin();
        h.page_count = r.getPageCount();
        h.bytes = r.getBytes();
        h.checksum = r.getChecksum();
        h.attempt = r.getAttempt();
        h.slot = r.getSlot();
        batch.chunks.push_back(h);
      }
      return ControlMessage(std::move(batch));
    }
    case gen::ControlMessage::ACKS: {
      auto r = root.getAcks();
      if (absl::Status s = CheckListSize(r.getAcks().size(), "acks"); !s.ok()) return s;
      AckBatch b;
      for (auto a : r.getAcks()) b.acks.push_back(ChunkAck{a.getChunkId(), a.getOk()});
      b.credit_bytes = r.getCreditBytes();
      b.credit_chunks = r.getCreditChunks();
      return ControlMessage(std::move(b));
    }
    case gen::ControlMessage::LAYER_READY:
      return ControlMessage(LayerReady{root.getLayerReady().getLayer()});
    case gen::ControlMessage::DONE:
      return ControlMessage(Done{root.getDone().getChunks(), root.getDone().getBytes()});
    case gen::ControlMessage::ABORT:
      return ControlMessage(Abort{root.getAbort().getCode(), StringOf(root.getAbort().getMessage())});
    case gen::ControlMessage::HEARTBEAT:
      return ControlMessage(Heartbeat{root.getHeartbeat().getSeq()});
    case gen::ControlMessage::QUIESCED:
      return ControlMessage(Quiesced{root.getQuiesced().getWrites()});
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "malformed control message: unknown message type ", uint16_t(root.which())));
}

}  // namespace

const char* ObjectKindName(ObjectKind k) {
  switch (k) {
    case ObjectKind::kMlaLatent: return "mla_latent";
    case ObjectKind::kIndexKey: return "index_key";
    case ObjectKind::kSummary: return "summary";
  }
  return "?";
}

std::string DescribeLayout(const ObjectLayout& l) {
  return absl::StrCat(ObjectKindName(l.kind), "{dtype=", int(l.dtype), " width=", l.width,
                      " scale_dtype=", int(l.scale_dtype), " scale_group=", l.scale_group,
                      " aux_dtype=", int(l.aux_dtype), " aux_width=", l.aux_width,
                      " unit_bytes=", l.unit_bytes, " unit_tokens=", l.unit_tokens,
                      " page_bytes=", l.page_bytes, "}");
}

const char* MessageName(const ControlMessage& m) {
  static constexpr const char* kNames[] = {"manifest", "accept",    "chunks",
                                           "acks",     "layer_ready", "done",
                                           "abort",    "heartbeat", "quiesced"};
  static_assert(std::size(kNames) == std::variant_size_v<ControlMessage>);
  return kNames[m.index()];
}

absl::Status AbortToStatus(const Abort& a) {
  absl::StatusCode code = a.code >= 1 && a.code <= 16 ? absl::StatusCode(a.code) : absl::StatusCode::kUnknown;
  return absl::Status(code, a.message.empty() ? "peer aborted the stream" : a.message);
}

Abort StatusToAbort(const absl::Status& s) {
  return Abort{uint32_t(s.code()), std::string(s.message())};
}

absl::StatusOr<std::string> EncodeFrame(const ControlMessage& msg) {
  try {
    capnp::MallocMessageBuilder builder;
    if (absl::Status s = Build(builder.initRoot<gen::ControlMessage>(), msg); !s.ok()) return s;
    kj::Array<capnp::word> words = capnp::messageToFlatArray(builder);
    kj::ArrayPtr<const kj::byte> bytes = words.asBytes();
    if (bytes.size() > kMaxFramePayload) {
      return absl::InvalidArgumentError(absl::StrCat(MessageName(msg), " message of ", bytes.size(),
                                                     " bytes exceeds the frame limit of ",
                                                     kMaxFramePayload));
    }
    std::string frame(kFrameHeaderBytes + bytes.size(), '\0');
    uint32_t header[2] = {kFrameMagic, uint32_t(bytes.size())};  // little-endian hosts only
    std::memcpy(frame.data(), header, sizeof(header));
    std::memcpy(frame.data() + kFrameHeaderBytes, bytes.begin(), bytes.size());
    return frame;
  } catch (const kj::Exception& e) {
    return absl::InternalError(absl::StrCat("encoding ", MessageName(msg), ": ", e.getDescription().cStr()));
  }
}

absl::StatusOr<uint32_t> DecodeFrameHeader(std::span<const uint8_t> header) {
  if (header.size() != kFrameHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat("frame header must be ", kFrameHeaderBytes,
                                                   " bytes, got ", header.size()));
  }
  uint32_t v[2];
  std::memcpy(v, header.data(), sizeof(v));
  if (v[0] != kFrameMagic) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad frame magic 0x", absl::Hex(v[0]), " (want \"PDKV\")"));
  }
  if (v[1] == 0 || v[1] % 8 != 0 || v[1] > kMaxFramePayload) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad frame length ", v[1], ": must be a non-zero multiple of 8 up to ", kMaxFramePayload));
  }
  return v[1];
}

absl::StatusOr<ControlMessage> DecodePayload(std::span<const uint8_t> payload) {
  if (payload.empty() || payload.size() % 8 != 0 || payload.size() > kMaxFramePayload) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad control payload size ", payload.size(), " (non-zero multiple of 8 up to ",
                     kMaxFramePayload, ")"));
  }
  try {
    // Copy into word-aligned storage: capnp reads words in place.
    kj::Array<capnp::word> words = kj::heapArray<capnp::word>(payload.size() / 8);
    std::memcpy(words.begin(), payload.data(), payload.size());
    capnp::ReaderOptions options;
    options.traversalLimitInWords = kTraversalLimitWords;
    options.nestingLimit = kNestingLimit;
    capnp::FlatArrayMessageReader reader(words.asPtr(), options);
    if (reader.getEnd() != words.end()) {
      return absl::InvalidArgumentError("malformed control message: trailing bytes after the message");
    }
    return Parse(reader.getRoot<gen::ControlMessage>());
  } catch (const kj::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed control message: ", e.getDescription().cStr()));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("malformed control message: ", e.what()));
  }
}

}  // namespace pd::proto
