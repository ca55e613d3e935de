# Frozen copy of proto/kv_control.capnp as first released (before senderNode,
# checksumEvery and quiesced): the codec test checks that old and new peers
# still understand each other. Never edit.
@0xd4a505f7b144bd7a;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("pd::proto::capnp_v1");

enum Dtype {
  none @0;
  e4m3 @1;
  bf16 @2;
  fp32 @3;
}

enum ObjectKind {
  mlaLatent @0;
  indexKey @1;
  summary @2;
}

# Byte layout of one cache object (kernels/kv_layout.h).
struct ObjectLayout {
  kind @0 :ObjectKind;
  dtype @1 :Dtype;          # main values
  width @2 :UInt32;         # main values per unit
  scaleDtype @3 :Dtype;     # quantisation scales (none for summaries)
  scaleGroup @4 :UInt32;    # values per scale
  auxDtype @5 :Dtype;       # MLA: the bf16 k_pe
  auxWidth @6 :UInt32;
  unitBytes @7 :UInt64;     # bytes per token (per-token objects) or per block (summaries)
  unitTokens @8 :UInt32;    # 1, or the summary block size
  pageBytes @9 :UInt64;     # bytes per page (0 for summaries)
}

# Sender -> receiver, the first message of a stream.
struct Manifest {
  requestId @0 :Text;
  modelFingerprint @1 :Text;
  numLayers @2 :UInt32;
  numTokens @3 :UInt64;
  pageTokens @4 :UInt32;
  objects @5 :List(ObjectLayout);
  backend @6 :Text;          # data-plane backend name; must match the receiver's
  senderInfo @7 :Data;       # backend blob (worker address, NCCL unique id, ...)
  maxChunkBytes @8 :UInt64;  # largest chunk the sender will ship
  staged @9 :Bool;           # sender asks for a staging ring instead of direct puts
  checksum @10 :Bool;        # chunks carry XXH3-64 checksums that the receiver verifies
  sourcePages @11 :List(Int32);  # the sender's page table (two-sided backends pair segments)
}

# Receiver -> sender: the handshake succeeded.
struct Accept {
  requestId @0 :Text;
  pageTable @1 :List(Int32);    # receiver page ids, one per token page
  receiverInfo @2 :Data;        # backend blob (worker address, rkey, ...)
  mlaOffsets @3 :List(UInt64);  # per layer: MLA pool offset in the registered region
  indexOffsets @4 :List(UInt64);
  summaryOffsets @5 :List(UInt64);  # per layer: this sequence's summary region
  stagingSlots @6 :UInt32;      # staged mode: ring slots (offset = slot * slotBytes)
  slotBytes @7 :UInt64;
  creditBytes @8 :UInt64;       # initial credit: bytes the sender may have unacknowledged
  creditChunks @9 :UInt32;      # and chunks
}

struct ChunkHeader {
  chunkId @0 :UInt32;
  layer @1 :UInt32;
  kind @2 :ObjectKind;
  tokenBegin @3 :UInt64;
  tokenEnd @4 :UInt64;
  pageBegin @5 :UInt32;   # index into the page table (summaries: first block)
  pageCount @6 :UInt32;   # pages (summaries: blocks)
  bytes @7 :UInt64;
  checksum @8 :UInt64;    # XXH3-64 of the bytes as they land, in order
  attempt @9 :UInt32;
  slot @10 :UInt32;       # staged mode only
}

struct ChunkAck {
  chunkId @0 :UInt32;
  ok @1 :Bool;            # false: checksum mismatch, resend
}

# Receiver -> sender: verdicts plus returned credit.
struct AckBatch {
  acks @0 :List(ChunkAck);
  creditBytes @1 :UInt64;
  creditChunks @2 :UInt32;
}

struct LayerReady {
  layer @0 :UInt32;
}

struct Done {
  chunks @0 :UInt32;
  bytes @1 :UInt64;
}

struct Abort {
  code @0 :UInt32;        # absl::StatusCode
  message @1 :Text;
}

struct Heartbeat {
  seq @0 :UInt64;
}

struct ControlMessage {
  union {
    manifest @0 :Manifest;
    accept @1 :Accept;
    chunks @2 :List(ChunkHeader);
    acks @3 :AckBatch;
    layerReady @4 :LayerReady;
    done @5 :Done;
    abort @6 :Abort;
    heartbeat @7 :Heartbeat;
  }
}
