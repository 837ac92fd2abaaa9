// chat.cpp — the mllama-tpu engine: runs an mllama bmodel on a BM1684X (or its simulator)
// through libbmrt, exposed to Python as the pybind11 module `chat`.
//
// Python decides what the model sees (token ids, positions, prefill masks, pixel values);
// this file moves it to the device, runs the nets, keeps the KV cache in device memory and
// does the per-token work of decode (position, mask row, cache update, token head).
//
// Read top to bottom, in the order data flows:
//   1. errors and host dtype conversion
//   2. device and bmodel: RAII handles, net discovery (layers, dims from the bmodel itself)
//   3. net launch helpers
//   4. KV cache
//   5. vision encoder and prefill
//   6. decode
//   7. token heads (greedy, penalty sampling)
//   8. the Python binding
// Every libbmrt/bmlib call is checked; a failure throws (never assert: it vanishes in
// release builds, and an abort would take the whole Python session down).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include "bmrt_api.h"

namespace py = pybind11;

// =========================================================================================
// 1. Errors and host dtype conversion
// =========================================================================================

// Decode was asked for a token that no longer fits in SEQLEN; Python turns it into a notice.
struct SeqlenReached : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] static void fail(const std::string& what) { throw std::runtime_error(what); }

static void check_bm(bm_status_t st, const char* call, const std::string& context) {
  if (st != BM_SUCCESS)
    fail(std::string(call) + " failed (bm_status " + std::to_string(static_cast<int>(st)) + ") for " +
         context);
}

static const char* dtype_name(bm_data_type_t t) {
  switch (t) {
    case BM_FLOAT32: return "f32";
    case BM_FLOAT16: return "f16";
    case BM_BFLOAT16: return "bf16";
    case BM_INT32: return "i32";
    case BM_UINT32: return "u32";
    case BM_INT16: return "i16";
    case BM_UINT16: return "u16";
    case BM_INT8: return "i8";
    case BM_UINT8: return "u8";
    default: return "int4/unknown";
  }
}

static size_t dtype_size(bm_data_type_t t) {
  switch (t) {
    case BM_FLOAT32: case BM_INT32: case BM_UINT32: return 4;
    case BM_FLOAT16: case BM_BFLOAT16: case BM_INT16: case BM_UINT16: return 2;
    case BM_INT8: case BM_UINT8: return 1;
    default: fail(std::string("unsupported tensor dtype ") + dtype_name(t));
  }
}

static uint16_t f32_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40);  // keep NaN a NaN
  x += 0x7FFFu + ((x >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(x >> 16);
}

static float bf16_to_f32(uint16_t h) {
  uint32_t x = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

static uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t exp = (x >> 23) & 0xFFu;
  uint32_t mant = x & 0x7FFFFFu;
  if (exp == 0xFF) return static_cast<uint16_t>(sign | 0x7C00u | (mant ? 0x200u : 0u));
  const int e = static_cast<int>(exp) - 127 + 15;
  if (e >= 0x1F) return static_cast<uint16_t>(sign | 0x7C00u);  // too large: inf
  if (e <= 0) {                                                  // f16 subnormal or zero
    if (e < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    const int shift = 14 - e;
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;  // a carry into the exponent is right
  return static_cast<uint16_t>(half);
}

static float f16_to_f32(uint16_t h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  const uint32_t x = exp == 0x1F ? (sign | 0x7F800000u | (mant << 13)) : (sign | ((exp + 112) << 23) | (mant << 13));
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// Host values (float or int32) -> raw device layout of `dt`.
template <typename T>
static std::vector<uint8_t> encode(const T* src, size_t n, bm_data_type_t dt) {
  std::vector<uint8_t> out(n * dtype_size(dt));
  for (size_t i = 0; i < n; ++i) {
    const T v = src[i];
    switch (dt) {
      case BM_FLOAT32: { const float f = static_cast<float>(v); std::memcpy(&out[i * 4], &f, 4); break; }
      case BM_INT32: { const int32_t k = static_cast<int32_t>(std::lround(static_cast<double>(v))); std::memcpy(&out[i * 4], &k, 4); break; }
      case BM_UINT32: { const uint32_t k = static_cast<uint32_t>(std::lround(static_cast<double>(v))); std::memcpy(&out[i * 4], &k, 4); break; }
      case BM_BFLOAT16: { const uint16_t b = f32_to_bf16(static_cast<float>(v)); std::memcpy(&out[i * 2], &b, 2); break; }
      case BM_FLOAT16: { const uint16_t b = f32_to_f16(static_cast<float>(v)); std::memcpy(&out[i * 2], &b, 2); break; }
      default: fail(std::string("cannot feed host values to a tensor of dtype ") + dtype_name(dt));
    }
  }
  return out;
}

// Raw device layout of `dt` -> host doubles (exact for every dtype used here).
static std::vector<double> decode_raw(const uint8_t* src, size_t n, bm_data_type_t dt) {
  std::vector<double> out(n);
  for (size_t i = 0; i < n; ++i) {
    switch (dt) {
      case BM_FLOAT32: { float f; std::memcpy(&f, src + i * 4, 4); out[i] = f; break; }
      case BM_INT32: { int32_t k; std::memcpy(&k, src + i * 4, 4); out[i] = k; break; }
      case BM_UINT32: { uint32_t k; std::memcpy(&k, src + i * 4, 4); out[i] = k; break; }
      case BM_BFLOAT16: { uint16_t b; std::memcpy(&b, src + i * 2, 2); out[i] = bf16_to_f32(b); break; }
      case BM_FLOAT16: { uint16_t b; std::memcpy(&b, src + i * 2, 2); out[i] = f16_to_f32(b); break; }
      default: fail(std::string("cannot read back a tensor of dtype ") + dtype_name(dt));
    }
  }
  return out;
}

// The simulator's firmware printf()s debug lines ("[0] do_allreduce", shapes of CPU layers) to
// stdout, where they would interleave with a streamed answer or break JSON output. On cmodel
// builds, stdout is pointed at stderr while a net runs: nothing is lost, stdout stays clean.
// MLLAMA_CMODEL_STDOUT=1 keeps them on stdout; MLLAMA_SIMULATOR_LOG=FILE sends them to FILE
// (appended) instead of stderr, so an interactive chat on the simulator stays readable.
static bool keep_simulator_stdout() {
  static const bool keep = [] {
    const char* v = std::getenv("MLLAMA_CMODEL_STDOUT");
    return v && *v && std::string(v) != "0";
  }();
  return keep;
}

static int simulator_sink_fd() {
  static const int fd = [] {
    const char* path = std::getenv("MLLAMA_SIMULATOR_LOG");
    if (!path || !*path) return 2;
    int f = ::open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    return f >= 0 ? f : 2;  // an unwritable log must not cost the messages
  }();
  return fd;
}

class QuietStdout {
 public:
  QuietStdout() {
#ifdef MLLAMA_CMODEL
    if (keep_simulator_stdout()) return;
    std::fflush(stdout);
    saved_ = ::dup(1);
    if (saved_ >= 0) ::dup2(simulator_sink_fd(), 1);
#endif
  }
  ~QuietStdout() {
    if (saved_ < 0) return;
    std::fflush(stdout);
    ::dup2(saved_, 1);
    ::close(saved_);
  }
  QuietStdout(const QuietStdout&) = delete;
  QuietStdout& operator=(const QuietStdout&) = delete;

 private:
  int saved_ = -1;
};

static double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// =========================================================================================
// 2. Device and bmodel: RAII handles, discovery
// =========================================================================================

class Device {
 public:
  explicit Device(int devid) : devid_(devid) {
    int count = 0;
    check_bm(bm_dev_getcount(&count), "bm_dev_getcount", "device discovery");
    // bm_dev_request aborts inside bmlib for an id it does not have: check first.
    if (devid < 0 || devid >= count)
      throw std::invalid_argument("device id " + std::to_string(devid) + " does not exist (" +
                                  std::to_string(count) + " device(s): ids 0.." + std::to_string(count - 1) + ")");
    check_bm(bm_dev_request(&handle_, devid), "bm_dev_request", "device " + std::to_string(devid));
  }
  ~Device() { if (handle_) bm_dev_free(handle_); }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  bm_handle_t handle() const { return handle_; }
  int id() const { return devid_; }

 private:
  int devid_;
  bm_handle_t handle_ = nullptr;
};

class Runtime {
 public:
  explicit Runtime(bm_handle_t h) : p_(bmrt_create(h)) {
    if (!p_) fail("bmrt_create failed");
  }
  ~Runtime() { if (p_) bmrt_destroy(p_); }
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;
  void* get() const { return p_; }

 private:
  void* p_;
};

// One allocation of device memory, freed with its owner.
class DeviceMem {
 public:
  DeviceMem() = default;
  DeviceMem(bm_handle_t h, size_t bytes, const std::string& what) : h_(h), bytes_(bytes) {
    if (bytes > 0xFFFFFFFFull) fail("device buffer for " + what + " exceeds 4 GiB");
    check_bm(bm_malloc_device_byte(h, &mem_, static_cast<unsigned int>(bytes)), "bm_malloc_device_byte", what);
  }
  ~DeviceMem() { release(); }
  DeviceMem(DeviceMem&& o) noexcept : h_(o.h_), mem_(o.mem_), bytes_(o.bytes_) { o.h_ = nullptr; }
  DeviceMem& operator=(DeviceMem&& o) noexcept {
    if (this != &o) {
      release();
      h_ = o.h_, mem_ = o.mem_, bytes_ = o.bytes_;
      o.h_ = nullptr;
    }
    return *this;
  }
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
  bool empty() const { return h_ == nullptr; }
  const bm_device_mem_t& mem() const { return mem_; }
  size_t bytes() const { return bytes_; }

 private:
  void release() {
    if (h_) bm_free_device(h_, mem_);
    h_ = nullptr;
  }
  bm_handle_t h_ = nullptr;
  bm_device_mem_t mem_{};
  size_t bytes_ = 0;
};

// A typed window on device memory: what one net produced or another consumes.
struct View {
  bm_device_mem_t mem{};
  bm_data_type_t dtype = BM_FLOAT32;
  size_t count = 0;  // elements
};

static size_t shape_count(const bm_shape_t& s) {
  size_t n = 1;
  for (int i = 0; i < s.num_dims; ++i) n *= static_cast<size_t>(s.dims[i]);
  return n;
}

// One net of the bmodel plus its own staging buffers (allocated on first use).
struct Net {
  std::string name;
  const bm_net_info_t* info = nullptr;
  std::vector<DeviceMem> in_stage, out_stage;

  int input(const std::string& n) const {
    for (int i = 0; i < info->input_num; ++i)
      if (n == info->input_names[i]) return i;
    return -1;
  }
  const bm_shape_t& in_shape(int i) const { return info->stages[0].input_shapes[i]; }
  const bm_shape_t& out_shape(int i) const { return info->stages[0].output_shapes[i]; }
  size_t in_count(int i) const { return shape_count(in_shape(i)); }
  size_t out_count(int i) const { return shape_count(out_shape(i)); }
  bm_data_type_t in_dtype(int i) const { return info->input_dtypes[i]; }
  bm_data_type_t out_dtype(int i) const { return info->output_dtypes[i]; }
  int dim(bool out, int i, int d) const {
    const bm_shape_t& s = out ? out_shape(i) : in_shape(i);
    return d < 0 ? s.dims[s.num_dims + d] : s.dims[d];
  }
};

// What block_i / block_cache_i must look like (net contract, DESIGN.md).
static const std::vector<std::string> kSelfPrefillInputs = {"input_states", "position_ids", "attention_mask"};
static const std::vector<std::string> kSelfDecodeInputs = {"input_states", "position_ids", "attention_mask",
                                                           "history_k", "history_v"};
static const std::vector<std::string> kCrossPrefillInputs = {"input_states", "cross_attention_states",
                                                             "text_row_mask", "attention_mask"};
static const std::vector<std::string> kCrossDecodeInputs = {"input_states", "text_row_mask", "attention_mask",
                                                            "cross_k", "cross_v"};

struct SamplingConfig {
  bool sample = false;  // false: greedy_head
  float temperature = 1.0f, top_p = 1.0f, repeat_penalty = 1.0f;
  int top_k = 1, repeat_last_n = 64;
};

// =========================================================================================
// The engine
// =========================================================================================

class Engine {
 public:
  // ---- dims read from the bmodel (valid after init) ----
  int SEQLEN = 0, HIDDEN_SIZE = 0, NUM_LAYERS = 0, KV_HEADS = 0, HEAD_DIM = 0;
  int MAX_TILES = 0, NUM_PATCHES = 0, TILE_SIZE = 0, VOCAB_SIZE = 0, SAMPLE_K = 0, RECENT_IDS = 0;
  std::vector<int> cross_layers;
  double last_vit_ms = 0, last_prefill_ms = 0, last_decode_ms = 0;

  ~Engine() { deinit(); }

  void init(const std::vector<int>& devids, const std::string& bmodel_path) {
    QuietStdout quiet;  // the simulator announces itself on stdout
    deinit();
    if (devids.size() != 1)
      throw std::invalid_argument("this engine runs a bmodel on exactly one device; got " +
                                  std::to_string(devids.size()) + " device ids");
    dev_ = std::make_unique<Device>(devids[0]);
    rt_ = std::make_unique<Runtime>(dev_->handle());
    if (!bmrt_load_bmodel(rt_->get(), bmodel_path.c_str())) {
      deinit();
      fail("bmrt_load_bmodel failed for " + bmodel_path + " (not a bmodel for this chip, or unreadable)");
    }
    try {
      discover(bmodel_path);
      allocate();
    } catch (...) {
      deinit();
      throw;
    }
  }

  void deinit() {
    QuietStdout quiet;
    // Buffers first, then the runtime, then the device: each needs the next to be freed.
    k_cache_.clear(), v_cache_.clear(), cross_k_.clear(), cross_v_.clear();
    shared_.clear();
    nets_.clear();
    vit_out_ = DeviceMem();
    rt_.reset();
    dev_.reset();
    allocated_ = 0;
    net_stats_.clear();
    is_cross_.clear(), cross_layers.clear();
    image_ready_ = cross_ready_ = false;
    token_pos_ = 0;
    history_.clear();
  }

  bool ready() const { return rt_ != nullptr; }

 private:
  std::unique_ptr<Device> dev_;
  std::unique_ptr<Runtime> rt_;
  std::map<std::string, Net> nets_;
  std::vector<bool> is_cross_;
  struct NetStat {
    long runs = 0;
    double ms = 0;
  };
  std::map<std::string, NetStat> net_stats_;  // launches and time per net, for profiling
  std::string bmodel_path_;
  size_t allocated_ = 0;  // bytes of device memory this engine allocated itself

  void require_ready() const {
    if (!rt_) fail("engine not initialised: call init(devids, bmodel_path) first");
  }

  Net& net(const std::string& n) { return nets_.at(n); }

  DeviceMem alloc(size_t bytes, const std::string& what) {
    DeviceMem m(dev_->handle(), bytes, what);
    allocated_ += bytes;
    return m;
  }

  // Reads every net of the contract, its inputs and dims; one exception lists all that is missing.
  void discover(const std::string& path) {
    bmodel_path_ = path;
    void* p = rt_->get();
    const int n = bmrt_get_network_number(p);
    const char** names = nullptr;
    bmrt_get_network_names(p, &names);
    if (n > 0 && !names) fail("bmrt_get_network_names returned nothing for " + path);
    for (int i = 0; i < n; ++i) {
      const bm_net_info_t* info = bmrt_get_network_info(p, names[i]);
      if (!info) {
        std::free(names);
        fail(std::string("bmrt_get_network_info failed for net ") + names[i]);
      }
      Net net;
      net.name = names[i];
      net.info = info;
      net.in_stage.resize(info->input_num);
      net.out_stage.resize(info->output_num);
      nets_.emplace(net.name, std::move(net));
    }
    std::free(names);

    std::vector<std::string> missing;
    auto need_net = [&](const std::string& name) {
      if (!nets_.count(name)) missing.push_back("net '" + name + "'");
      return nets_.count(name) > 0;
    };
    auto need_inputs = [&](const std::string& name, const std::vector<std::string>& ins, int outputs) {
      if (!need_net(name)) return;
      const Net& nt = nets_.at(name);
      for (const auto& in : ins)
        if (nt.input(in) < 0) missing.push_back("input '" + in + "' of net '" + name + "'");
      if (nt.info->output_num != outputs)
        missing.push_back(std::to_string(outputs) + " outputs of net '" + name + "' (it has " +
                          std::to_string(nt.info->output_num) + ")");
      if (nt.info->stage_num < 1) missing.push_back("a compiled stage of net '" + name + "'");
    };
    need_inputs("vit", {"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"}, 1);
    need_inputs("embedding", {"input_ids"}, 1);
    need_inputs("embedding_cache", {"input_ids"}, 1);
    need_inputs("lm_head", {"hidden_states"}, 1);
    need_inputs("greedy_head", {"logits"}, 1);
    need_inputs("penalty_sample_head", {"logits", "recent_ids", "top_p", "temperature", "repeat_penalty"}, 2);
    int layers = 0;
    while (nets_.count("block_" + std::to_string(layers))) ++layers;
    if (layers == 0) missing.push_back("net 'block_0' (no decoder layers)");
    for (int i = 0; i < layers; ++i) {
      const std::string b = "block_" + std::to_string(i), c = "block_cache_" + std::to_string(i);
      const bool cross = nets_.at(b).input("cross_attention_states") >= 0;
      is_cross_.push_back(cross);
      if (cross) {
        cross_layers.push_back(i);
        need_inputs(b, kCrossPrefillInputs, 3);
        need_inputs(c, kCrossDecodeInputs, 1);
      } else {
        need_inputs(b, kSelfPrefillInputs, 3);
        need_inputs(c, kSelfDecodeInputs, 3);
      }
    }
    if (!missing.empty()) {
      std::string msg = "bmodel " + path + " is not an mllama-tpu bmodel: missing ";
      for (size_t i = 0; i < missing.size(); ++i) msg += (i ? ", " : "") + missing[i];
      throw std::invalid_argument(msg);
    }
    int first_self = -1;
    for (int i = 0; i < layers && first_self < 0; ++i)
      if (!is_cross_[i]) first_self = i;
    if (first_self < 0) throw std::invalid_argument("bmodel " + path + " has no self-attention layer");

    NUM_LAYERS = layers;
    const Net& emb = net("embedding");
    SEQLEN = emb.dim(false, 0, -1);
    HIDDEN_SIZE = emb.dim(true, 0, -1);
    const Net& blk = net("block_" + std::to_string(first_self));
    KV_HEADS = blk.dim(true, 1, -2);
    HEAD_DIM = blk.dim(true, 1, -1);
    const Net& vit = net("vit");
    MAX_TILES = vit.dim(true, 0, 0);
    NUM_PATCHES = vit.dim(true, 0, 1);
    TILE_SIZE = vit.dim(false, vit.input("pixel_values"), -1);
    VOCAB_SIZE = net("lm_head").dim(true, 0, -1);
    const Net& ps = net("penalty_sample_head");
    SAMPLE_K = ps.dim(true, 0, -1);
    RECENT_IDS = ps.dim(false, ps.input("recent_ids"), -1);
    sampling_.top_k = SAMPLE_K;
  }

  // =======================================================================================
  // 3. Net launch helpers
  // =======================================================================================

  DeviceMem& stage(Net& n, bool out, int i) {
    DeviceMem& m = out ? n.out_stage[i] : n.in_stage[i];
    if (m.empty()) {
      const size_t bytes = out ? n.info->max_output_bytes[i] : n.info->max_input_bytes[i];
      m = alloc(bytes, std::string(out ? "output '" : "input '") +
                           (out ? n.info->output_names[i] : n.info->input_names[i]) + "' of net '" + n.name + "'");
    }
    return m;
  }

  // Host values -> `dst` in dtype `dt`; returns the view of what was written.
  template <typename T>
  View upload(const T* data, size_t count, bm_data_type_t dt, const DeviceMem& dst, const std::string& what) {
    std::vector<uint8_t> raw = encode(data, count, dt);
    if (raw.size() > dst.bytes()) fail(what + ": " + std::to_string(raw.size()) + " bytes do not fit its buffer");
    check_bm(bm_memcpy_s2d_partial(dev_->handle(), dst.mem(), raw.data(), static_cast<unsigned int>(raw.size())),
             "bm_memcpy_s2d_partial", what);
    return View{dst.mem(), dt, count};
  }

  // Host values -> input `name` of net `n` (its staging buffer, its dtype); checks the count.
  template <typename T>
  View upload_input(Net& n, const std::string& name, const T* data, size_t count) {
    const int i = n.input(name);
    if (count != n.in_count(i))
      throw std::invalid_argument("input '" + name + "' of net '" + n.name + "' takes " +
                                  std::to_string(n.in_count(i)) + " values, got " + std::to_string(count));
    return upload(data, count, n.in_dtype(i), stage(n, false, i), "input '" + name + "' of net '" + n.name + "'");
  }

  std::vector<uint8_t> download_raw(const View& v, size_t offset, size_t count, const std::string& what) {
    const size_t es = dtype_size(v.dtype);
    std::vector<uint8_t> raw(count * es);
    check_bm(bm_memcpy_d2s_partial_offset(dev_->handle(), raw.data(), v.mem, static_cast<unsigned int>(raw.size()),
                                          static_cast<unsigned int>(offset * es)),
             "bm_memcpy_d2s_partial_offset", what);
    return raw;
  }

  std::vector<double> download(const View& v, const std::string& what) {
    const auto raw = download_raw(v, 0, v.count, what);
    return decode_raw(raw.data(), v.count, v.dtype);
  }

  // Copies `count` elements of `src` from element `src_off` into `dst` (dtype `dst_dt`) at
  // element `dst_off`: on device when the dtypes agree, through the host otherwise.
  void copy(const View& src, size_t src_off, const bm_device_mem_t& dst, bm_data_type_t dst_dt, size_t dst_off,
            size_t count, const std::string& what) {
    if (src.dtype == dst_dt) {
      const size_t es = dtype_size(dst_dt);
      check_bm(bm_memcpy_d2d_byte(dev_->handle(), dst, dst_off * es, src.mem, src_off * es, count * es),
               "bm_memcpy_d2d_byte", what);
      return;
    }
    const auto raw = download_raw(src, src_off, count, what);
    const auto vals = decode_raw(raw.data(), count, src.dtype);
    const auto enc = encode(vals.data(), count, dst_dt);
    check_bm(bm_memcpy_s2d_partial_offset(dev_->handle(), dst, const_cast<uint8_t*>(enc.data()),
                                          static_cast<unsigned int>(enc.size()),
                                          static_cast<unsigned int>(dst_off * dtype_size(dst_dt))),
             "bm_memcpy_s2d_partial_offset", what);
  }

  // Runs net `n`. `inputs` maps input names to views (any dtype: a mismatch is converted into
  // the net's staging buffer); `outputs[i]` is where output i goes (nullptr: staging buffer).
  // Returns a view per output, in the net's output order and dtypes.
  std::vector<View> launch(Net& n, const std::map<std::string, View>& inputs,
                           const std::vector<const DeviceMem*>& outputs = {}) {
    const int ni = n.info->input_num, no = n.info->output_num;
    std::vector<bm_tensor_t> in(ni), out(no);
    for (int i = 0; i < ni; ++i) {
      const std::string name = n.info->input_names[i];
      auto it = inputs.find(name);
      if (it == inputs.end()) fail("net '" + n.name + "': no value given for input '" + name + "'");
      View v = it->second;
      if (v.count != n.in_count(i))
        fail("net '" + n.name + "' input '" + name + "' expects " + std::to_string(n.in_count(i)) +
             " elements, the engine has " + std::to_string(v.count));
      if (v.dtype != n.in_dtype(i)) {
        const DeviceMem& s = stage(n, false, i);
        copy(v, 0, s.mem(), n.in_dtype(i), 0, v.count, "input '" + name + "' of net '" + n.name + "'");
        v = View{s.mem(), n.in_dtype(i), v.count};
      }
      in[i].dtype = n.in_dtype(i);
      in[i].shape = n.in_shape(i);
      in[i].device_mem = v.mem;
      in[i].st_mode = BM_STORE_1N;
    }
    std::vector<View> views(no);
    for (int i = 0; i < no; ++i) {
      const DeviceMem* target = i < static_cast<int>(outputs.size()) ? outputs[i] : nullptr;
      if (!target) target = &stage(n, true, i);
      if (target->bytes() < n.info->max_output_bytes[i])
        fail("net '" + n.name + "': buffer for output " + std::to_string(i) + " is too small");
      out[i].dtype = n.out_dtype(i);
      out[i].shape = n.out_shape(i);
      out[i].device_mem = target->mem();
      out[i].st_mode = BM_STORE_1N;
      views[i] = View{target->mem(), n.out_dtype(i), n.out_count(i)};
    }
    const auto t0 = std::chrono::steady_clock::now();
    QuietStdout quiet;
    if (!bmrt_launch_tensor_ex(rt_->get(), n.name.c_str(), in.data(), ni, out.data(), no, true, false))
      fail("bmrt_launch_tensor_ex failed for net '" + n.name + "'");
    check_bm(bm_thread_sync(dev_->handle()), "bm_thread_sync", "net '" + n.name + "'");
    NetStat& st = net_stats_[n.name];
    ++st.runs;
    st.ms += ms_since(t0);
    return views;
  }

  // =======================================================================================
  // 4. KV cache
  // =======================================================================================
  // Self layer i: K and V of every position, [SEQ, KV, D] each, in the dtype block_cache_i
  // reads them as history; written whole by prefill, one row per decode step.
  // Cross layer i: K and V of the image patches [T*P, KV, D], written by prefill, read by decode.
  std::vector<DeviceMem> k_cache_, v_cache_, cross_k_, cross_v_;
  std::vector<bm_data_type_t> cache_dtype_, cross_dtype_;
  // Engine-wide buffers: hidden-state ping-pong, prefill masks, decode masks, ...
  std::map<std::string, DeviceMem> shared_;
  DeviceMem vit_out_;

  void allocate() {
    const size_t kv_elems = static_cast<size_t>(SEQLEN) * KV_HEADS * HEAD_DIM;
    const size_t cross_elems = static_cast<size_t>(MAX_TILES) * NUM_PATCHES * KV_HEADS * HEAD_DIM;
    k_cache_.resize(NUM_LAYERS), v_cache_.resize(NUM_LAYERS), cross_k_.resize(NUM_LAYERS), cross_v_.resize(NUM_LAYERS);
    cache_dtype_.assign(NUM_LAYERS, BM_FLOAT32), cross_dtype_.assign(NUM_LAYERS, BM_FLOAT32);
    for (int i = 0; i < NUM_LAYERS; ++i) {
      Net& dec = net("block_cache_" + std::to_string(i));
      const std::string tag = " of layer " + std::to_string(i);
      if (is_cross_[i]) {
        cross_dtype_[i] = dec.in_dtype(dec.input("cross_k"));
        const size_t b = cross_elems * dtype_size(cross_dtype_[i]);
        cross_k_[i] = alloc(std::max(b, net("block_" + std::to_string(i)).info->max_output_bytes[1]), "cross K" + tag);
        cross_v_[i] = alloc(std::max(b, net("block_" + std::to_string(i)).info->max_output_bytes[2]), "cross V" + tag);
      } else {
        cache_dtype_[i] = dec.in_dtype(dec.input("history_k"));
        const size_t b = kv_elems * dtype_size(cache_dtype_[i]);
        k_cache_[i] = alloc(std::max(b, net("block_" + std::to_string(i)).info->max_output_bytes[1]), "K cache" + tag);
        v_cache_[i] = alloc(std::max(b, net("block_" + std::to_string(i)).info->max_output_bytes[2]), "V cache" + tag);
      }
    }
    // 4 bytes per element fits every dtype a hidden state can have.
    const size_t seq_hidden = static_cast<size_t>(SEQLEN) * HIDDEN_SIZE * 4;
    for (const char* b : {"hidden_a", "hidden_b"}) shared_[b] = alloc(seq_hidden, std::string("prefill ") + b);
    for (const char* b : {"dec_hidden_a", "dec_hidden_b"}) shared_[b] = alloc(HIDDEN_SIZE * 4, std::string("decode ") + b);
    const size_t tp = static_cast<size_t>(MAX_TILES) * NUM_PATCHES;
    shared_["position_ids"] = alloc(SEQLEN * 4, "prefill position ids");
    shared_["self_mask"] = alloc(static_cast<size_t>(SEQLEN) * SEQLEN * 4, "prefill attention mask");
    shared_["cross_mask"] = alloc(SEQLEN * tp * 4, "prefill cross-attention mask");
    shared_["row_mask"] = alloc(SEQLEN * 4, "prefill text row mask");
    shared_["dec_position"] = alloc(4, "decode position id");
    shared_["dec_self_mask"] = alloc((SEQLEN + 1) * 4, "decode attention mask");
    shared_["dec_cross_mask"] = alloc(tp * 4, "decode cross-attention mask");
    shared_["dec_row_mask"] = alloc(4, "decode text row mask");
    vit_out_ = alloc(net("vit").info->max_output_bytes[0], "vision encoder output");
  }

  // Input dtype `name` of the first net of kind `cross` that reads it (shared buffers are
  // written in that dtype; a net wanting another converts in launch()).
  bm_data_type_t consumer_dtype(bool prefill, bool cross, const std::string& name) {
    for (int i = 0; i < NUM_LAYERS; ++i)
      if (is_cross_[i] == cross) {
        Net& n = net((prefill ? "block_" : "block_cache_") + std::to_string(i));
        return n.in_dtype(n.input(name));
      }
    return BM_FLOAT32;
  }

  // =======================================================================================
  // 5. Vision encoder and prefill
  // =======================================================================================
  bool image_ready_ = false;  // vit output in vit_out_ belongs to the current image
  bool cross_ready_ = false;  // cross K/V of the last prefill are valid: decode runs cross layers
  View vit_states_;

 public:
  void encode_image(const std::vector<float>& pixel_values, const std::vector<int32_t>& aspect_ratio_ids,
                    const std::vector<int32_t>& aspect_ratio_mask) {
    require_ready();
    const auto t0 = std::chrono::steady_clock::now();
    Net& vit = net("vit");
    std::map<std::string, View> in;
    in["pixel_values"] = upload_input(vit, "pixel_values", pixel_values.data(), pixel_values.size());
    in["aspect_ratio_ids"] = upload_input(vit, "aspect_ratio_ids", aspect_ratio_ids.data(), aspect_ratio_ids.size());
    in["aspect_ratio_mask"] = upload_input(vit, "aspect_ratio_mask", aspect_ratio_mask.data(), aspect_ratio_mask.size());
    image_ready_ = false;
    vit_states_ = launch(vit, in, {&vit_out_})[0];
    image_ready_ = true;
    last_vit_ms = ms_since(t0);
  }

  void clear_image() { image_ready_ = false; }

  // The whole (padded) prompt in one pass. Cross layers run when a cross-attention mask is
  // given (an image is in the prompt); text-only prompts skip them, as transformers does.
  int prefill(const std::vector<int32_t>& input_ids, const std::vector<int32_t>& position_ids,
              const std::vector<float>& attention_mask, int token_count,
              const std::optional<std::vector<float>>& cross_attention_mask,
              const std::optional<std::vector<float>>& text_row_mask,
              const std::optional<std::vector<float>>& decode_cross_mask, float decode_text_row) {
    require_ready();
    const auto t0 = std::chrono::steady_clock::now();
    const size_t seq = SEQLEN, tp = static_cast<size_t>(MAX_TILES) * NUM_PATCHES;
    if (token_count < 1 || token_count > SEQLEN)
      throw std::invalid_argument("token_count " + std::to_string(token_count) + " is outside 1.." +
                                  std::to_string(SEQLEN) + " (SEQLEN of the bmodel)");
    expect_count("input_ids", input_ids.size(), seq);
    expect_count("position_ids", position_ids.size(), seq);
    expect_count("attention_mask", attention_mask.size(), seq * seq);
    const bool with_image = cross_attention_mask.has_value();
    if (with_image) {
      if (!image_ready_) fail("prefill with a cross-attention mask but no image encoded: call encode_image first");
      if (!text_row_mask || !decode_cross_mask)
        throw std::invalid_argument("an image prompt needs text_row_mask and decode_cross_mask too");
      expect_count("cross_attention_mask", cross_attention_mask->size(), seq * tp);
      expect_count("text_row_mask", text_row_mask->size(), seq);
      expect_count("decode_cross_mask", decode_cross_mask->size(), tp);
    }
    // Until this prefill completes, decode refuses to run on a half-written cache.
    cross_ready_ = false;
    history_.clear();

    Net& emb = net("embedding");
    View h = launch(emb, {{"input_ids", upload_input(emb, "input_ids", input_ids.data(), seq)}},
                    {&shared_.at("hidden_a")})[0];
    const View pos = upload(position_ids.data(), seq, consumer_dtype(true, false, "position_ids"),
                            shared_.at("position_ids"), "prefill position ids");
    const View mask = upload(attention_mask.data(), seq * seq, consumer_dtype(true, false, "attention_mask"),
                             shared_.at("self_mask"), "prefill attention mask");
    View xmask, rows;
    if (with_image) {
      xmask = upload(cross_attention_mask->data(), seq * tp, consumer_dtype(true, true, "attention_mask"),
                     shared_.at("cross_mask"), "prefill cross-attention mask");
      rows = upload(text_row_mask->data(), seq, consumer_dtype(true, true, "text_row_mask"), shared_.at("row_mask"),
                    "prefill text row mask");
    }
    bool in_a = true;  // ping-pong: which hidden buffer holds the current state
    for (int i = 0; i < NUM_LAYERS; ++i) {
      if (is_cross_[i] && !with_image) continue;
      Net& b = net("block_" + std::to_string(i));
      const DeviceMem* next = &shared_.at(in_a ? "hidden_b" : "hidden_a");
      if (is_cross_[i]) {
        const bool direct = b.out_dtype(1) == cross_dtype_[i] && b.out_dtype(2) == cross_dtype_[i];
        auto o = launch(b,
                        {{"input_states", h}, {"cross_attention_states", vit_states_}, {"text_row_mask", rows},
                         {"attention_mask", xmask}},
                        {next, direct ? &cross_k_[i] : nullptr, direct ? &cross_v_[i] : nullptr});
        if (!direct) store_whole(o[1], cross_k_[i], cross_dtype_[i], "cross K of layer " + std::to_string(i)),
                     store_whole(o[2], cross_v_[i], cross_dtype_[i], "cross V of layer " + std::to_string(i));
        h = o[0];
      } else {
        const bool direct = b.out_dtype(1) == cache_dtype_[i] && b.out_dtype(2) == cache_dtype_[i];
        auto o = launch(b, {{"input_states", h}, {"position_ids", pos}, {"attention_mask", mask}},
                        {next, direct ? &k_cache_[i] : nullptr, direct ? &v_cache_[i] : nullptr});
        if (!direct) store_whole(o[1], k_cache_[i], cache_dtype_[i], "K cache of layer " + std::to_string(i)),
                     store_whole(o[2], v_cache_[i], cache_dtype_[i], "V cache of layer " + std::to_string(i));
        h = o[0];
      }
      in_a = !in_a;
    }
    // Decode state: next cache slot, next position id, ids seen (for the repeat penalty).
    token_pos_ = token_count;
    next_position_ = position_ids[token_count - 1] + 1;
    history_.assign(input_ids.begin(), input_ids.begin() + token_count);
    cross_ready_ = with_image;
    if (with_image) {
      decode_cross_mask_ = *decode_cross_mask;
      decode_text_row_ = decode_text_row;
    }
    const int token = head(last_row_logits(h, token_count - 1, HIDDEN_SIZE));
    last_prefill_ms = ms_since(t0);
    return token;
  }

 private:
  static void expect_count(const char* what, size_t got, size_t want) {
    if (got != want)
      throw std::invalid_argument(std::string(what) + " has " + std::to_string(got) + " values; the bmodel takes " +
                                  std::to_string(want));
  }

  void store_whole(const View& v, const DeviceMem& dst, bm_data_type_t dt, const std::string& what) {
    copy(v, 0, dst.mem(), dt, 0, v.count, what);
  }

  // lm_head on row `row` of hidden states `h` ([rows, H]).
  View last_row_logits(const View& h, size_t row, size_t hidden) {
    Net& lm = net("lm_head");
    const DeviceMem& s = stage(lm, false, 0);
    copy(h, row * hidden, s.mem(), lm.in_dtype(0), 0, hidden, "last hidden state into lm_head");
    return launch(lm, {{"hidden_states", View{s.mem(), lm.in_dtype(0), hidden}}})[0];
  }

  // =======================================================================================
  // 6. Decode
  // =======================================================================================
  int token_pos_ = 0;       // cache slot the next fed token occupies
  int next_position_ = 0;   // its position id
  std::vector<int32_t> history_;  // prompt + fed tokens
  std::vector<float> decode_cross_mask_;
  float decode_text_row_ = 1.0f;

 public:
  // Feeds `token` (the last one generated) and returns the next one.
  int decode(int token) {
    require_ready();
    if (history_.empty()) fail("decode before prefill: call prefill first");
    if (token_pos_ >= SEQLEN)
      throw SeqlenReached("the KV cache is full (SEQLEN " + std::to_string(SEQLEN) +
                          " tokens of this bmodel); start a new conversation or compile with a larger --seq_length");
    const auto t0 = std::chrono::steady_clock::now();
    Net& emb = net("embedding_cache");
    const int32_t id = token;
    View h = launch(emb, {{"input_ids", upload_input(emb, "input_ids", &id, 1)}}, {&shared_.at("dec_hidden_a")})[0];
    const int32_t p = next_position_;
    const View pos = upload(&p, 1, consumer_dtype(false, false, "position_ids"), shared_.at("dec_position"),
                            "decode position id");
    // Visible: the cache slots filled so far and the new token itself (last column).
    std::vector<float> row(SEQLEN + 1, -10000.0f);
    std::fill(row.begin(), row.begin() + token_pos_, 0.0f);
    row[SEQLEN] = 0.0f;
    const View mask = upload(row.data(), row.size(), consumer_dtype(false, false, "attention_mask"),
                             shared_.at("dec_self_mask"), "decode attention mask");
    View xmask, rows;
    if (cross_ready_) {
      xmask = upload(decode_cross_mask_.data(), decode_cross_mask_.size(), consumer_dtype(false, true, "attention_mask"),
                     shared_.at("dec_cross_mask"), "decode cross-attention mask");
      rows = upload(&decode_text_row_, 1, consumer_dtype(false, true, "text_row_mask"), shared_.at("dec_row_mask"),
                    "decode text row mask");
    }
    const size_t kv_row = static_cast<size_t>(KV_HEADS) * HEAD_DIM;
    bool in_a = true;
    for (int i = 0; i < NUM_LAYERS; ++i) {
      if (is_cross_[i] && !cross_ready_) continue;
      Net& b = net("block_cache_" + std::to_string(i));
      const DeviceMem* next = &shared_.at(in_a ? "dec_hidden_b" : "dec_hidden_a");
      const std::string tag = " of layer " + std::to_string(i);
      if (is_cross_[i]) {
        const size_t n = static_cast<size_t>(MAX_TILES) * NUM_PATCHES * kv_row;
        h = launch(b, {{"input_states", h}, {"text_row_mask", rows}, {"attention_mask", xmask},
                       {"cross_k", View{cross_k_[i].mem(), cross_dtype_[i], n}},
                       {"cross_v", View{cross_v_[i].mem(), cross_dtype_[i], n}}},
                   {next})[0];
      } else {
        const size_t n = static_cast<size_t>(SEQLEN) * kv_row;
        auto o = launch(b, {{"input_states", h}, {"position_ids", pos}, {"attention_mask", mask},
                            {"history_k", View{k_cache_[i].mem(), cache_dtype_[i], n}},
                            {"history_v", View{v_cache_[i].mem(), cache_dtype_[i], n}}},
                        {next});
        // The new token's K/V become cache row token_pos_.
        copy(o[1], 0, k_cache_[i].mem(), cache_dtype_[i], token_pos_ * kv_row, kv_row, "K cache" + tag);
        copy(o[2], 0, v_cache_[i].mem(), cache_dtype_[i], token_pos_ * kv_row, kv_row, "V cache" + tag);
        h = o[0];
      }
      in_a = !in_a;
    }
    ++token_pos_, ++next_position_;
    history_.push_back(token);
    const int next_token = head(last_row_logits(h, 0, HIDDEN_SIZE));
    last_decode_ms = ms_since(t0);
    return next_token;
  }

  int position() const { return token_pos_; }

  // =======================================================================================
  // 7. Token heads
  // =======================================================================================
  void set_sampling(bool sample, float temperature, float top_p, int top_k, float repeat_penalty, int repeat_last_n,
                    uint64_t seed) {
    require_ready();
    if (top_k < 1 || top_k > SAMPLE_K)
      throw std::invalid_argument("top_k " + std::to_string(top_k) + " is outside 1.." + std::to_string(SAMPLE_K) +
                                  " (the K the bmodel's penalty_sample_head was compiled with)");
    if (!(top_p > 0.0f && top_p <= 1.0f)) throw std::invalid_argument("top_p must be in (0, 1]");
    if (!(temperature >= 0.0f)) throw std::invalid_argument("temperature must be >= 0");
    if (!(repeat_penalty > 0.0f)) throw std::invalid_argument("repeat_penalty must be > 0");
    if (repeat_last_n < 0) throw std::invalid_argument("repeat_last_n must be >= 0");
    // Temperature 0 is the limit of sampling: the most likely token, i.e. greedy.
    sampling_ = SamplingConfig{sample && temperature > 0.0f, temperature, top_p, repeat_penalty, top_k, repeat_last_n};
    rng_.seed(static_cast<std::mt19937::result_type>(seed));
  }

 private:
  SamplingConfig sampling_;
  std::mt19937 rng_{42};

  int head(const View& logits) { return sampling_.sample ? sample_head(logits) : greedy_head(logits); }

  int greedy_head(const View& logits) {
    Net& g = net("greedy_head");
    const View tok = launch(g, {{"logits", logits}})[0];
    return static_cast<int>(download(tok, "token of greedy_head")[0]);
  }

  int sample_head(const View& logits) {
    Net& s = net("penalty_sample_head");
    // Recent ids: the last repeat_last_n ids seen, oldest first, padded in front by repeating
    // the oldest (a repeated id is penalised once, so padding changes nothing; same layout as
    // the ONNX reference engine). None wanted: penalty 1 (no-op).
    const size_t r = static_cast<size_t>(RECENT_IDS);
    const size_t take = std::min({static_cast<size_t>(sampling_.repeat_last_n), r, history_.size()});
    std::vector<int32_t> recent(r, *(history_.end() - std::max<size_t>(take, 1)));
    std::copy(history_.end() - take, history_.end(), recent.end() - take);
    const float penalty = take ? sampling_.repeat_penalty : 1.0f;
    auto o = launch(s, {{"logits", logits},
                        {"recent_ids", upload_input(s, "recent_ids", recent.data(), r)},
                        {"top_p", upload_input(s, "top_p", &sampling_.top_p, 1)},
                        {"temperature", upload_input(s, "temperature", &sampling_.temperature, 1)},
                        {"repeat_penalty", upload_input(s, "repeat_penalty", &penalty, 1)}});
    const auto probs = download(o[0], "probs of penalty_sample_head");
    const auto tokens = download(o[1], "tokens of penalty_sample_head");
    // The head gives the K best candidates, best first, already top_p-filtered; keep top_k
    // and draw on the host with the seeded generator (reproducible across runs).
    const size_t k = std::min(static_cast<size_t>(sampling_.top_k), probs.size());
    double total = 0;
    for (size_t i = 0; i < k; ++i) total += std::max(0.0, probs[i]);
    if (!(total > 0)) return static_cast<int>(tokens[0]);
    const double u = (static_cast<double>(rng_() >> 5) / static_cast<double>(1u << 27)) * total;
    double acc = 0;
    for (size_t i = 0; i < k; ++i) {
      acc += std::max(0.0, probs[i]);
      if (u < acc) return static_cast<int>(tokens[i]);
    }
    return static_cast<int>(tokens[k - 1]);
  }

 public:
  // Device memory: what this engine allocated (buffers, KV cache) and, where the driver
  // reports it, what the whole device uses (bmodel weights and runtime included).
  py::dict memory_info() {
    require_ready();
    py::dict d;
    d["engine_bytes"] = allocated_;
    bm_dev_stat_t st{};
    // The simulator answers with zeros: only a real device's numbers are reported.
    if (bm_get_stat(dev_->handle(), &st) == BM_SUCCESS && st.mem_total > 0) {
      d["device_used_mb"] = st.mem_used;
      d["device_total_mb"] = st.mem_total;
    }
    return d;
  }

  py::dict net_io(const std::string& name) {
    require_ready();
    auto it = nets_.find(name);
    if (it == nets_.end()) throw std::invalid_argument("no net '" + name + "' in " + bmodel_path_);
    const Net& n = it->second;
    auto describe = [&](bool out) {
      py::list l;
      const int num = out ? n.info->output_num : n.info->input_num;
      for (int i = 0; i < num; ++i) {
        const bm_shape_t& s = out ? n.out_shape(i) : n.in_shape(i);
        std::vector<int> dims(s.dims, s.dims + s.num_dims);
        py::dict e;
        e["name"] = out ? n.info->output_names[i] : n.info->input_names[i];
        e["shape"] = dims;
        e["dtype"] = dtype_name(out ? n.out_dtype(i) : n.in_dtype(i));
        l.append(e);
      }
      return l;
    };
    py::dict d;
    d["inputs"] = describe(false);
    d["outputs"] = describe(true);
    return d;
  }

  // {net: (launches, total ms)} since init or the last reset.
  py::dict net_stats(bool reset) {
    py::dict d;
    for (const auto& kv : net_stats_) d[py::str(kv.first)] = py::make_tuple(kv.second.runs, kv.second.ms);
    if (reset) net_stats_.clear();
    return d;
  }

  std::vector<std::string> net_names() const {
    std::vector<std::string> v;
    for (const auto& kv : nets_) v.push_back(kv.first);
    return v;
  }
};

// =========================================================================================
// 8. The Python binding
// =========================================================================================

template <typename T>
static std::vector<T> to_vec(const py::array_t<T, py::array::c_style | py::array::forcecast>& a) {
  return std::vector<T>(a.data(), a.data() + a.size());
}

template <typename T>
static std::optional<std::vector<T>> to_opt_vec(const py::object& o) {
  if (o.is_none()) return std::nullopt;
  return to_vec<T>(py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(o));
}

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// The host conversions the engine falls back on when two nets disagree on a dtype, exposed so
// tests can hold them against numpy/torch: f32 values -> dtype -> f32, and the raw 16-bit codes.
static py::tuple host_roundtrip(const F32& values, const std::string& dtype) {
  bm_data_type_t dt;
  if (dtype == "f16") dt = BM_FLOAT16;
  else if (dtype == "bf16") dt = BM_BFLOAT16;
  else if (dtype == "f32") dt = BM_FLOAT32;
  else throw std::invalid_argument("dtype must be f32, f16 or bf16, got '" + dtype + "'");
  const size_t n = static_cast<size_t>(values.size());
  const auto raw = encode(values.data(), n, dt);
  const auto back = decode_raw(raw.data(), n, dt);
  py::array_t<float> out(n);
  for (size_t i = 0; i < n; ++i) out.mutable_data()[i] = static_cast<float>(back[i]);
  py::array_t<uint16_t> codes(dt == BM_FLOAT32 ? 0 : n);
  if (dt != BM_FLOAT32) std::memcpy(codes.mutable_data(), raw.data(), n * 2);
  return py::make_tuple(out, codes);
}

PYBIND11_MODULE(chat, m) {
  m.doc() = "mllama-tpu engine: Llama-3.2-Vision bmodel on a BM1684X (or its simulator) through libbmrt";
  py::register_exception<SeqlenReached>(m, "SeqlenReached", PyExc_RuntimeError);
#ifdef MLLAMA_CMODEL
  // The simulator says goodbye on stdout from its exit-time destructors, after Python is done.
  // A Python atexit handler (they run before those) flushes Python's stdout and then points
  // fd 1 at stderr (or MLLAMA_SIMULATOR_LOG), so the goodbye never lands in a streamed answer
  // or JSON output.
  py::module_::import("atexit").attr("register")(py::cpp_function([] {
    if (keep_simulator_stdout()) return;
    try {
      py::module_::import("sys").attr("stdout").attr("flush")();
    } catch (const py::error_already_set&) {
    }
    std::fflush(stdout);
    ::dup2(simulator_sink_fd(), 1);
  }));
#endif

  py::class_<Engine>(m, "Engine")
      .def(py::init<>())
      .def("init", &Engine::init, py::arg("devids"), py::arg("bmodel_path"),
           py::call_guard<py::gil_scoped_release>(), "Open the device(s) and load the bmodel.")
      .def("deinit", &Engine::deinit, "Free device memory, the runtime and the device.")
      .def_property_readonly("ready", &Engine::ready)
      .def_readonly("SEQLEN", &Engine::SEQLEN)
      .def_readonly("HIDDEN_SIZE", &Engine::HIDDEN_SIZE)
      .def_readonly("NUM_LAYERS", &Engine::NUM_LAYERS)
      .def_readonly("KV_HEADS", &Engine::KV_HEADS)
      .def_readonly("HEAD_DIM", &Engine::HEAD_DIM)
      .def_readonly("MAX_TILES", &Engine::MAX_TILES)
      .def_readonly("NUM_PATCHES", &Engine::NUM_PATCHES)
      .def_readonly("TILE_SIZE", &Engine::TILE_SIZE)
      .def_readonly("VOCAB_SIZE", &Engine::VOCAB_SIZE)
      .def_readonly("SAMPLE_K", &Engine::SAMPLE_K)
      .def_readonly("RECENT_IDS", &Engine::RECENT_IDS)
      .def_readonly("cross_layers", &Engine::cross_layers)
      .def_readonly("last_vit_ms", &Engine::last_vit_ms)
      .def_readonly("last_prefill_ms", &Engine::last_prefill_ms)
      .def_readonly("last_decode_ms", &Engine::last_decode_ms)
      .def_property_readonly("position", &Engine::position)
      .def(
          "encode_image",
          [](Engine& e, const F32& pixel_values, const I32& aspect_ratio_ids, const I32& aspect_ratio_mask) {
            auto pv = to_vec<float>(pixel_values);
            auto ids = to_vec<int32_t>(aspect_ratio_ids);
            auto am = to_vec<int32_t>(aspect_ratio_mask);
            py::gil_scoped_release unlocked;
            e.encode_image(pv, ids, am);
          },
          py::arg("pixel_values"), py::arg("aspect_ratio_ids"), py::arg("aspect_ratio_mask"),
          "Run the vision encoder; its output stays in device memory for the next prefills.")
      .def("clear_image", &Engine::clear_image)
      .def(
          "prefill",
          [](Engine& e, const I32& input_ids, const I32& position_ids, const F32& attention_mask, int token_count,
             const py::object& cross_attention_mask, const py::object& text_row_mask,
             const py::object& decode_cross_mask, float decode_text_row) {
            auto ids = to_vec<int32_t>(input_ids);
            auto pos = to_vec<int32_t>(position_ids);
            auto mask = to_vec<float>(attention_mask);
            auto xmask = to_opt_vec<float>(cross_attention_mask);
            auto rows = to_opt_vec<float>(text_row_mask);
            auto dmask = to_opt_vec<float>(decode_cross_mask);
            py::gil_scoped_release unlocked;
            return e.prefill(ids, pos, mask, token_count, xmask, rows, dmask, decode_text_row);
          },
          py::arg("input_ids"), py::arg("position_ids"), py::arg("attention_mask"), py::arg("token_count"),
          py::arg("cross_attention_mask") = py::none(), py::arg("text_row_mask") = py::none(),
          py::arg("decode_cross_mask") = py::none(), py::arg("decode_text_row") = 1.0f,
          "Run the padded prompt; returns the first generated token. No cross mask: text-only (cross layers skipped).")
      .def("decode", &Engine::decode, py::arg("token"), py::call_guard<py::gil_scoped_release>(),
           "Feed the last token, return the next; raises SeqlenReached when the cache is full.")
      .def(
          "set_sampling",
          [](Engine& e, const std::string& mode, float temperature, float top_p, int top_k, float repeat_penalty,
             int repeat_last_n, uint64_t seed) {
            if (mode != "greedy" && mode != "penalty_sample")
              throw std::invalid_argument("sampling mode must be 'greedy' or 'penalty_sample', got '" + mode + "'");
            e.set_sampling(mode == "penalty_sample", temperature, top_p, top_k, repeat_penalty, repeat_last_n, seed);
          },
          py::arg("mode") = "greedy", py::arg("temperature") = 1.0f, py::arg("top_p") = 1.0f, py::arg("top_k") = 1,
          py::arg("repeat_penalty") = 1.0f, py::arg("repeat_last_n") = 64, py::arg("seed") = 42)
      .def("memory_info", &Engine::memory_info)
      .def("net_io", &Engine::net_io, py::arg("name"))
      .def("net_stats", &Engine::net_stats, py::arg("reset") = false,
           "{net: (launches, total ms)}: where device time goes (profiling, benchmarks).")
      .def("net_names", &Engine::net_names);
  m.def("host_roundtrip", &host_roundtrip, py::arg("values"), py::arg("dtype"),
        "f32 values through the engine's host conversion to dtype and back: (values, 16-bit codes).");
}
