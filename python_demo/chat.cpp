// chat.cpp — the mllama-tpu engine: runs an mllama bmodel on a BM1684X (or its simulator)
// through libbmrt, exposed to Python as the pybind11 module `chat` (class `chat.Mllama`).
//
// Python decides what the model sees (token ids, positions, prefill masks, pixel values, the
// sampling head's inputs) and owns every rule about it (mllama_tpu/inputs.py, sampling.py,
// contract.py; ARCHITECTURE.md). This file moves it to the device, runs the nets, keeps the KV
// cache in device memory and does the per-token work of decode: position, the self-attention
// mask row (by the contract's rule and values, handed over at init), the cache update.
//
// Read top to bottom, in the order data flows:
//   1. errors
//   2. host dtype conversion
//   3. the simulator's stdout
//   4. state: device handles, nets and layers, the KV cache, step buffers
//   5. loading: the bmodel checked against the contract, state allocated
//   6. launching a net
//   7. the vision encoder
//   8. the layer pass (one loop for prefill and decode)
//   9. prefill, decode and the token heads
//  10. the Python binding
// Every libbmrt/bmlib call is checked; a failure throws (never assert: it vanishes in
// release builds, and an abort would take the whole Python session down).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <dlfcn.h>
#include <fcntl.h>
#include <unistd.h>

#include "bmrt_api.h"

namespace py = pybind11;

// =========================================================================================
// 1. Errors
// =========================================================================================

[[noreturn]] static void fail(const std::string& what) { throw std::runtime_error(what); }

static void check_bm(bm_status_t st, const char* call, const std::string& context) {
  if (st != BM_SUCCESS)
    fail(std::string(call) + " failed (bm_status " + std::to_string(static_cast<int>(st)) + ") for " +
         context);
}

static void expect_count(const std::string& what, size_t got, size_t want) {
  if (got != want)
    throw std::invalid_argument(what + " has " + std::to_string(got) + " values; the bmodel takes " +
                                std::to_string(want));
}

// =========================================================================================
// 2. Host dtype conversion (used where two nets disagree on a dtype, and for host tensors)
// =========================================================================================

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

// Host values (float or int32) -> the raw device layout of `dt`.
template <typename T>
static std::vector<uint8_t> to_device_bytes(const T* src, size_t n, bm_data_type_t dt) {
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
static std::vector<double> from_device_bytes(const uint8_t* src, size_t n, bm_data_type_t dt) {
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

// =========================================================================================
// 3. The simulator's stdout
// =========================================================================================

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

// On the simulator, the preload libcmodel_yield.so lets the simulator's polling threads sleep
// while no engine call uses the device (cmodel_yield.c); every call that launches a net or
// copies to or from the device holds a DeviceInUse. Without the preload, and on a chip, no-op.
class DeviceInUse {
 public:
  DeviceInUse() { report(+1); }
  ~DeviceInUse() { report(-1); }
  DeviceInUse(const DeviceInUse&) = delete;
  DeviceInUse& operator=(const DeviceInUse&) = delete;

 private:
  static void report(int delta) {
#ifdef MLLAMA_CMODEL
    using use_fn = void (*)(int);
    static const use_fn use = reinterpret_cast<use_fn>(::dlsym(RTLD_DEFAULT, "cmodel_yield_device_use"));
    if (use) use(delta);
#else
    (void)delta;
#endif
  }
};

static double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// =========================================================================================
// 4. State
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

// The net contract as Python's mllama_tpu.contract.engine_spec() hands it over: input names and
// output count of every head and of each block role, and the additive mask values.
struct NetShape {
  std::vector<std::string> inputs;
  int outputs = 0;
};
struct Contract {
  std::map<std::string, NetShape> heads;   // "vit", "embedding", ..., "penalty_sample_head"
  std::map<std::string, NetShape> blocks;  // step nets "self", "cross"; "cross_kv"
  // Net name templates with {layer} and {rows}: "decode" (one token), "chunk", "cross_kv".
  std::map<std::string, std::string> names;
  float mask_visible = 0.0f, mask_hidden = 0.0f;
};

// `name` against a template of literal text and {layer}/{rows} fields of digits: the fields'
// values, or nothing when it does not match.
static std::optional<std::map<std::string, int>> match_name(const std::string& templ, const std::string& name) {
  std::map<std::string, int> fields;
  size_t t = 0, n = 0;
  while (t < templ.size()) {
    if (templ[t] == '{') {
      const size_t close = templ.find('}', t);
      if (close == std::string::npos) return std::nullopt;
      const size_t start = n;
      while (n < name.size() && std::isdigit(static_cast<unsigned char>(name[n]))) ++n;
      if (n == start || n - start > 6) return std::nullopt;
      fields[templ.substr(t + 1, close - t - 1)] = std::stoi(name.substr(start, n - start));
      t = close + 1;
    } else {
      if (n >= name.size() || name[n] != templ[t]) return std::nullopt;
      ++t, ++n;
    }
  }
  if (n != name.size()) return std::nullopt;
  return fields;
}

// One decoder layer: its kind and its step nets by the tokens they run (1: decode), resolved
// once at load; a cross layer also has the net that projects an image into its K/V.
struct Layer {
  bool cross = false;
  std::map<int, Net*> steps;  // rows -> block_cache_i (1) / block_chunk{rows}_i
  Net* cross_kv = nullptr;    // cross_kv_i
  Net* decode() const { return steps.at(1); }
};

// Dims read from the bmodel itself (valid after init).
struct Dims {
  int seq = 0, hidden = 0, layers = 0, kv_heads = 0, head_dim = 0;
  int max_tiles = 0, patches = 0, tile_size = 0, vocab = 0, sample_k = 0, recent_ids = 0;
  std::vector<int> prefill_lengths;  // chunk lengths of the step nets (every layer has the same)
  int max_chunk() const { return prefill_lengths.empty() ? 1 : prefill_lengths.back(); }
};

// K/V of every layer in device memory, in the dtype the decode block reads them as.
// Self layer i: [SEQ, KV, D] each, rows written by prefill chunks and decode steps.
// Cross layer i: [KV, T*P, D] each (head-major), written by cross_kv_i once per image.
class KVCache {
 public:
  struct Entry {
    DeviceMem k, v;
    bm_data_type_t dtype = BM_FLOAT32;
    size_t elems = 0;
  };
  std::vector<Entry> layer;
  int filled = 0;            // cache slots holding a token (self layers)
  bool image_ready = false;  // cross K/V hold the current image's
  bool has_cross = false;    // the tokens in the cache saw the image: decode runs the cross layers

  View k(int i) const { return View{layer[i].k.mem(), layer[i].dtype, layer[i].elems}; }
  View v(int i) const { return View{layer[i].v.mem(), layer[i].dtype, layer[i].elems}; }
  void clear() { layer.clear(), filled = 0, image_ready = false, has_cross = false; }
};

// Device buffers of one kind of step (prefill: the largest chunk's rows; decode: one row), written
// by the host or passed from layer to layer. Masks and positions are stored in the dtype their
// first reader takes.
struct StepBuffers {
  DeviceMem hidden[2];  // ping-pong between layers
  DeviceMem position_ids, self_mask, cross_mask, text_row_mask;
  View positions, self_attention, cross_attention, text_rows;  // what the current step uploaded
};

class Mllama {
 public:
  Dims dims;
  std::vector<int> cross_layers;
  double last_vit_ms = 0, last_prefill_ms = 0, last_decode_ms = 0;

  ~Mllama() { deinit(); }

 private:
  // ---- what the engine holds, in the order it is made ----
  Contract contract_;
  std::string bmodel_path_;
  std::unique_ptr<Device> dev_;
  std::unique_ptr<Runtime> rt_;
  std::map<std::string, Net> nets_;
  Net *vit_ = nullptr, *embedding_ = nullptr, *embedding_cache_ = nullptr, *lm_head_ = nullptr;
  Net *greedy_head_ = nullptr, *sample_head_ = nullptr;
  std::vector<Layer> layers_;
  KVCache kv_;
  StepBuffers prefill_buf_, decode_buf_;
  DeviceMem vit_out_;
  int next_position_ = 0;     // position id of the next fed token
  bool decoding_ = false;     // a prompt's last chunk completed: decode may feed tokens
  size_t allocated_ = 0;      // bytes of device memory this engine allocated itself
  struct NetStat {
    long runs = 0;
    double ms = 0;
  };
  std::map<std::string, NetStat> net_stats_;  // launches and time per net, for profiling

 public:
  // =======================================================================================
  // 5. Loading
  // =======================================================================================
  void init(int devid, const std::string& bmodel_path, const Contract& contract) {
    DeviceInUse in_use;
    QuietStdout quiet;  // the simulator announces itself on stdout
    deinit();
    contract_ = contract;
    dev_ = std::make_unique<Device>(devid);
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
    DeviceInUse in_use;
    QuietStdout quiet;
    // Buffers first, then the runtime, then the device: each needs the next to be freed.
    kv_.clear();
    prefill_buf_ = StepBuffers(), decode_buf_ = StepBuffers();
    vit_out_ = DeviceMem();
    layers_.clear(), cross_layers.clear();
    vit_ = embedding_ = embedding_cache_ = lm_head_ = greedy_head_ = sample_head_ = nullptr;
    nets_.clear();
    rt_.reset();
    dev_.reset();
    allocated_ = 0;
    net_stats_.clear();
    next_position_ = 0;
    decoding_ = false;
    dims = Dims();
  }

  bool ready() const { return rt_ != nullptr; }
  int position() const { return kv_.filled; }

 private:
  void require_ready() const {
    if (!rt_) fail("engine not initialised: call init(devid, bmodel_path, contract) first");
  }

  void zero(const DeviceMem& m, const std::string& what) {
    const std::vector<uint8_t> zeros(m.bytes(), 0);
    check_bm(bm_memcpy_s2d_partial(dev_->handle(), m.mem(), const_cast<uint8_t*>(zeros.data()),
                                   static_cast<unsigned int>(zeros.size())),
             "bm_memcpy_s2d_partial", what);
  }

  DeviceMem alloc(size_t bytes, const std::string& what) {
    DeviceMem m(dev_->handle(), bytes, what);
    allocated_ += bytes;
    return m;
  }

  // Every net of the bmodel, checked against the contract; one exception lists all that is missing.
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
    auto resolve = [&](const std::string& name, const NetShape& shape) -> Net* {
      auto it = nets_.find(name);
      if (it == nets_.end()) {
        missing.push_back("net '" + name + "'");
        return nullptr;
      }
      const Net& nt = it->second;
      for (const auto& in : shape.inputs)
        if (nt.input(in) < 0) missing.push_back("input '" + in + "' of net '" + name + "'");
      if (nt.info->output_num != shape.outputs)
        missing.push_back(std::to_string(shape.outputs) + " outputs of net '" + name + "' (it has " +
                          std::to_string(nt.info->output_num) + ")");
      if (nt.info->stage_num < 1) missing.push_back("a compiled stage of net '" + name + "'");
      return &it->second;
    };
    auto head = [&](const char* name) -> Net* {
      auto it = contract_.heads.find(name);
      if (it == contract_.heads.end()) fail(std::string("the contract names no head '") + name + "'");
      return resolve(name, it->second);
    };
    auto role = [&](const std::string& r) -> const NetShape& {
      auto it = contract_.blocks.find(r);
      if (it == contract_.blocks.end()) fail("the contract names no block role '" + r + "'");
      return it->second;
    };
    auto templ = [&](const std::string& r) -> const std::string& {
      auto it = contract_.names.find(r);
      if (it == contract_.names.end()) fail("the contract names no net template '" + r + "'");
      return it->second;
    };
    vit_ = head("vit");
    embedding_ = head("embedding");
    embedding_cache_ = head("embedding_cache");
    lm_head_ = head("lm_head");
    greedy_head_ = head("greedy_head");
    sample_head_ = head("penalty_sample_head");
    // Per-layer nets by their names: step nets by rows (decode's is 1), cross_kv per cross layer.
    std::map<int, std::map<int, Net*>> steps;
    std::map<int, Net*> cross_kv;
    for (auto& kv : nets_) {
      if (auto f = match_name(templ("decode"), kv.first)) steps[f->at("layer")][1] = &kv.second;
      else if (auto f = match_name(templ("chunk"), kv.first)) steps[f->at("layer")][f->at("rows")] = &kv.second;
      else if (auto f = match_name(templ("cross_kv"), kv.first)) cross_kv[f->at("layer")] = &kv.second;
    }
    int count = 0;
    while (steps.count(count)) ++count;
    if (count == 0) missing.push_back("net '" + templ("decode") + "' for layer 0 (no decoder layers)");
    for (int i = 0; i < count; ++i) {
      Layer l;
      l.cross = cross_kv.count(i) > 0;
      const std::string layer = std::to_string(i);
      if (!steps[i].count(1)) missing.push_back("the decode net of layer " + layer);
      for (auto& st : steps[i]) {
        resolve(st.second->name, role(l.cross ? "cross" : "self"));
        l.steps[st.first] = st.second;
      }
      if (l.cross) l.cross_kv = resolve(cross_kv[i]->name, role("cross_kv"));
      std::vector<int> lengths;
      for (auto& st : l.steps)
        if (st.first > 1) lengths.push_back(st.first);
      if (lengths.empty()) missing.push_back("a prefill chunk net of layer " + layer);
      if (i == 0) dims.prefill_lengths = lengths;
      else if (lengths != dims.prefill_lengths) missing.push_back("layer " + layer + "'s chunk lengths (layer 0's differ)");
      if (l.cross) cross_layers.push_back(i);
      layers_.push_back(l);
    }
    if (!missing.empty()) {
      std::string msg = "bmodel " + path + " is not an mllama-tpu bmodel: missing ";
      for (size_t i = 0; i < missing.size(); ++i) msg += (i ? ", " : "") + missing[i];
      throw std::invalid_argument(msg);
    }
    const Layer* first_self = nullptr;
    for (const Layer& l : layers_)
      if (!l.cross && !first_self) first_self = &l;
    if (!first_self) throw std::invalid_argument("bmodel " + path + " has no self-attention layer");
    const Net& self_decode = *first_self->decode();

    dims.layers = count;
    dims.seq = self_decode.dim(false, self_decode.input("history_k"), 1);
    dims.hidden = embedding_->dim(true, 0, -1);
    dims.kv_heads = self_decode.dim(true, 1, -2);
    dims.head_dim = self_decode.dim(true, 1, -1);
    if (embedding_->dim(false, 0, -1) != dims.max_chunk())
      throw std::invalid_argument("bmodel " + path + ": net 'embedding' takes " +
                                  std::to_string(embedding_->dim(false, 0, -1)) + " ids, the largest chunk is " +
                                  std::to_string(dims.max_chunk()));
    dims.max_tiles = vit_->dim(true, 0, 0);
    dims.patches = vit_->dim(true, 0, 1);
    dims.tile_size = vit_->dim(false, vit_->input("pixel_values"), -1);
    dims.vocab = lm_head_->dim(true, 0, -1);
    dims.sample_k = sample_head_->dim(true, 0, -1);
    dims.recent_ids = sample_head_->dim(false, sample_head_->input("recent_ids"), -1);
  }

  void allocate() {
    const size_t kv_row = static_cast<size_t>(dims.kv_heads) * dims.head_dim;
    const size_t self_elems = static_cast<size_t>(dims.seq) * kv_row;
    const size_t cross_elems = static_cast<size_t>(dims.max_tiles) * dims.patches * kv_row;
    kv_.layer.resize(dims.layers);
    for (int i = 0; i < dims.layers; ++i) {
      const Layer& l = layers_[i];
      KVCache::Entry& e = kv_.layer[i];
      const std::string tag = " of layer " + std::to_string(i);
      const Net& d = *l.decode();
      e.dtype = d.in_dtype(d.input(l.cross ? "cross_k" : "history_k"));
      e.elems = l.cross ? cross_elems : self_elems;
      // Cross K/V: at least what cross_kv_i writes there directly (its outputs 0 and 1).
      const size_t bytes = e.elems * dtype_size(e.dtype);
      const size_t k_out = l.cross ? l.cross_kv->info->max_output_bytes[0] : 0;
      const size_t v_out = l.cross ? l.cross_kv->info->max_output_bytes[1] : 0;
      e.k = alloc(std::max(bytes, k_out), (l.cross ? "cross K" : "K cache") + tag);
      e.v = alloc(std::max(bytes, v_out), (l.cross ? "cross V" : "V cache") + tag);
      // Every step reads all SEQ slots and masks the unfilled ones; freed device memory may hold
      // anything, and a NaN or Inf there survives the additive mask. Slots start as zeros.
      if (!l.cross) zero(e.k, "K cache" + tag), zero(e.v, "V cache" + tag);
    }
    // 4 bytes per element fits every dtype a hidden state, mask or position can have.
    const size_t seq = dims.seq, tp = static_cast<size_t>(dims.max_tiles) * dims.patches;
    auto make = [&](StepBuffers& b, size_t rows, size_t self_cols, const char* step) {
      const std::string s = std::string(step) + " ";
      for (DeviceMem& h : b.hidden) h = alloc(rows * dims.hidden * 4, s + "hidden states");
      b.position_ids = alloc(rows * 4, s + "position ids");
      b.self_mask = alloc(rows * self_cols * 4, s + "attention mask");
      b.cross_mask = alloc(rows * tp * 4, s + "cross-attention mask");
      b.text_row_mask = alloc(rows * 4, s + "text row mask");
    };
    const size_t chunk = dims.max_chunk();
    make(prefill_buf_, chunk, seq + chunk, "prefill");
    make(decode_buf_, 1, seq + 1, "decode");
    vit_out_ = alloc(vit_->info->max_output_bytes[0], "vision encoder output");
  }

  // Input dtype `name` of the first layer's step net of `rows` of kind `cross` (step buffers
  // are written in that dtype; a net wanting another converts in launch()).
  bm_data_type_t reader_dtype(int rows, bool cross, const std::string& name) const {
    for (const Layer& l : layers_)
      if (l.cross == cross) {
        const Net& n = *l.steps.at(rows);
        return n.in_dtype(n.input(name));
      }
    return BM_FLOAT32;
  }

  // =======================================================================================
  // 6. Launching a net
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
    std::vector<uint8_t> raw = to_device_bytes(data, count, dt);
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
    return from_device_bytes(raw.data(), v.count, v.dtype);
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
    const auto vals = from_device_bytes(raw.data(), count, src.dtype);
    const auto enc = to_device_bytes(vals.data(), count, dst_dt);
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

 public:
  // =======================================================================================
  // 7. The vision encoder and the cross K/V of an image
  // =======================================================================================
  // Once per image: the vit, then every cross layer's K/V from its states, kept in the cache
  // for every prefill chunk and decode step until the next image.
  void encode_image(const std::vector<float>& pixel_values, const std::vector<int32_t>& aspect_ratio_ids,
                    const std::vector<int32_t>& aspect_ratio_mask) {
    DeviceInUse in_use;
    require_ready();
    const auto t0 = std::chrono::steady_clock::now();
    std::map<std::string, View> in;
    in["pixel_values"] = upload_input(*vit_, "pixel_values", pixel_values.data(), pixel_values.size());
    in["aspect_ratio_ids"] = upload_input(*vit_, "aspect_ratio_ids", aspect_ratio_ids.data(), aspect_ratio_ids.size());
    in["aspect_ratio_mask"] =
        upload_input(*vit_, "aspect_ratio_mask", aspect_ratio_mask.data(), aspect_ratio_mask.size());
    kv_.image_ready = false;  // no chunk or decode step may read half-written cross K/V
    decoding_ = false;        // the cache's tokens saw the previous image: prefill again
    const View states = launch(*vit_, in, {&vit_out_})[0];
    for (int i : cross_layers) {
      const Layer& l = layers_[i];
      KVCache::Entry& e = kv_.layer[i];
      const bool direct = l.cross_kv->out_dtype(0) == e.dtype && l.cross_kv->out_dtype(1) == e.dtype;
      const auto o = launch(*l.cross_kv, {{"cross_attention_states", states}},
                            {direct ? &e.k : nullptr, direct ? &e.v : nullptr});
      if (!direct) {
        const std::string tag = " of layer " + std::to_string(i);
        copy(o[0], 0, e.k.mem(), e.dtype, 0, o[0].count, "cross K" + tag);
        copy(o[1], 0, e.v.mem(), e.dtype, 0, o[1].count, "cross V" + tag);
      }
    }
    kv_.image_ready = true;
    last_vit_ms = ms_since(t0);
  }

 private:
  // =======================================================================================
  // 8. The layer pass: every layer's step net once, for a prefill chunk or a decode step
  // =======================================================================================
  // `size` tokens (the step net's length; `rows` of them real) at cache slot `slot`. Self layers
  // read positions, the mask over cache + step, and the cache, and their new K/V rows become
  // cache slots slot..slot+rows-1. Cross layers read the cross mask and text rows and the
  // image's K/V, and run only when the step's tokens see an image (as transformers).
  View run_layers(StepBuffers& b, int size, int rows, int slot, bool with_image, View h) {
    const size_t kv_row = static_cast<size_t>(dims.kv_heads) * dims.head_dim;
    int next = 1;
    for (int i = 0; i < dims.layers; ++i) {
      const Layer& l = layers_[i];
      if (l.cross && !with_image) continue;
      Net& n = *l.steps.at(size);
      std::map<std::string, View> in{{"input_states", h}};
      if (l.cross) {
        in["text_row_mask"] = b.text_rows;
        in["attention_mask"] = b.cross_attention;
        in["cross_k"] = kv_.k(i), in["cross_v"] = kv_.v(i);
      } else {
        in["position_ids"] = b.positions;
        in["attention_mask"] = b.self_attention;
        in["history_k"] = kv_.k(i), in["history_v"] = kv_.v(i);
      }
      const std::vector<View> o = launch(n, in, {&b.hidden[next]});
      if (!l.cross) {  // the step's real rows become cache slots
        const std::string tag = " of layer " + std::to_string(i);
        copy(o[1], 0, kv_.layer[i].k.mem(), kv_.layer[i].dtype, slot * kv_row, rows * kv_row, "K cache" + tag);
        copy(o[2], 0, kv_.layer[i].v.mem(), kv_.layer[i].dtype, slot * kv_row, rows * kv_row, "V cache" + tag);
      }
      h = o[0];
      next = 1 - next;
    }
    return h;
  }

  // =======================================================================================
  // 9. Prefill chunks, decode and the token heads
  // =======================================================================================
 public:
  // What Python's ChunkInputs holds, flattened (mllama_tpu/inputs.py defines every value).
  struct Chunk {
    int offset = 0, rows = 0, size = 0;
    std::vector<int32_t> input_ids, position_ids;
    std::vector<float> attention_mask;
    std::optional<std::vector<float>> cross_attention_mask, text_row_mask;
  };
  // The penalty_sample_head's inputs besides the logits (mllama_tpu/sampling.py); none: greedy.
  struct SampleInputs {
    std::vector<int32_t> recent_ids;
    float top_p = 1.0f, temperature = 1.0f, repeat_penalty = 1.0f;
  };
  // What the last chunk of a prompt also does (engines.base.Finish): the heads, and the cross
  // rows every decode step of the prompt reads.
  struct Finish {
    std::optional<SampleInputs> sample;
    std::optional<std::vector<float>> decode_cross_mask;
    float decode_text_row = 1.0f;
  };
  // What a step returns: the greedy head's token, or the sampling head's K candidates.
  struct HeadOutput {
    int token = -1;
    std::vector<float> probs;
    std::vector<int32_t> tokens;
  };

  // Runs one chunk of a prompt against the cache slots before c.offset (those the engine's
  // caller found still valid) and caches its rows; the last chunk (`finish`) runs the heads.
  HeadOutput prefill_chunk(const Chunk& c, const std::optional<Finish>& finish) {
    DeviceInUse in_use;
    require_ready();
    const auto t0 = std::chrono::steady_clock::now();
    const size_t seq = dims.seq, tp = static_cast<size_t>(dims.max_tiles) * dims.patches, size = c.size;
    if (std::find(dims.prefill_lengths.begin(), dims.prefill_lengths.end(), c.size) == dims.prefill_lengths.end())
      throw std::invalid_argument("no step net of " + std::to_string(c.size) + " tokens in this bmodel");
    if (c.rows < 1 || c.rows > c.size || c.offset < 0 || c.offset > kv_.filled || c.offset + c.rows > dims.seq)
      throw std::invalid_argument("chunk of " + std::to_string(c.rows) + " tokens at slot " + std::to_string(c.offset) +
                                  " does not fit a cache of " + std::to_string(kv_.filled) + " filled / " +
                                  std::to_string(dims.seq) + " slots");
    expect_count("input_ids", c.input_ids.size(), size);
    expect_count("position_ids", c.position_ids.size(), size);
    expect_count("attention_mask", c.attention_mask.size(), size * (seq + size));
    const bool with_image = c.cross_attention_mask.has_value();
    if (with_image) {
      if (!kv_.image_ready) fail("prefill with a cross-attention mask but no image encoded: call encode_image first");
      if (!c.text_row_mask) throw std::invalid_argument("an image chunk needs text_row_mask too");
      expect_count("cross_attention_mask", c.cross_attention_mask->size(), size * tp);
      expect_count("text_row_mask", c.text_row_mask->size(), size);
      if (finish && !finish->decode_cross_mask)
        throw std::invalid_argument("an image prompt needs decode_cross_attention_mask too");
      if (finish) expect_count("decode_cross_attention_mask", finish->decode_cross_mask->size(), tp);
    }
    // Until the prompt's last chunk completes, decode refuses to run on a half-written cache.
    kv_.filled = c.offset;
    decoding_ = false;

    StepBuffers& b = prefill_buf_;
    // The embedding net takes the largest chunk's ids; a shorter chunk reads its first rows.
    std::vector<int32_t> ids(dims.max_chunk(), c.input_ids.back());
    std::copy(c.input_ids.begin(), c.input_ids.end(), ids.begin());
    View h = launch(*embedding_, {{"input_ids", upload_input(*embedding_, "input_ids", ids.data(), ids.size())}},
                    {&b.hidden[0]})[0];
    h.count = size * dims.hidden;
    b.positions = upload(c.position_ids.data(), size, reader_dtype(c.size, false, "position_ids"), b.position_ids,
                         "prefill position ids");
    b.self_attention = upload(c.attention_mask.data(), size * (seq + size), reader_dtype(c.size, false, "attention_mask"),
                              b.self_mask, "prefill attention mask");
    if (with_image) {
      b.cross_attention = upload(c.cross_attention_mask->data(), size * tp, reader_dtype(c.size, true, "attention_mask"),
                                 b.cross_mask, "prefill cross-attention mask");
      b.text_rows = upload(c.text_row_mask->data(), size, reader_dtype(c.size, true, "text_row_mask"), b.text_row_mask,
                           "prefill text row mask");
    }
    h = run_layers(b, c.size, c.rows, c.offset, with_image, h);
    kv_.filled = c.offset + c.rows;
    next_position_ = c.position_ids[c.rows - 1] + 1;
    HeadOutput out;
    if (finish) {
      kv_.has_cross = with_image;
      if (with_image) {  // every decode step of this prompt reads the same cross row: uploaded once, here
        StepBuffers& d = decode_buf_;
        d.cross_attention = upload(finish->decode_cross_mask->data(), tp, reader_dtype(1, true, "attention_mask"),
                                   d.cross_mask, "decode cross-attention mask");
        d.text_rows = upload(&finish->decode_text_row, 1, reader_dtype(1, true, "text_row_mask"), d.text_row_mask,
                             "decode text row mask");
      }
      out = heads(h, c.rows - 1, finish->sample);
      decoding_ = true;
    }
    last_prefill_ms = ms_since(t0);
    return out;
  }

  // Feeds `token` (the last one generated) and returns what the head makes of the next one.
  HeadOutput decode(int token, const std::optional<SampleInputs>& sample) {
    DeviceInUse in_use;
    require_ready();
    if (!decoding_) fail("decode before prefill: call prefill first");
    if (kv_.filled >= dims.seq)  // Python stops before this (Engine.is_full): a guard of the cache bounds
      fail("the KV cache is full (SEQLEN " + std::to_string(dims.seq) + ")");
    const auto t0 = std::chrono::steady_clock::now();
    StepBuffers& b = decode_buf_;
    const int32_t id = token;
    View h = launch(*embedding_cache_, {{"input_ids", upload_input(*embedding_cache_, "input_ids", &id, 1)}},
                    {&b.hidden[0]})[0];
    const int32_t position = next_position_;
    b.positions = upload(&position, 1, reader_dtype(1, false, "position_ids"), b.position_ids, "decode position id");
    const std::vector<float> row = decode_self_mask(kv_.filled);
    b.self_attention = upload(row.data(), row.size(), reader_dtype(1, false, "attention_mask"), b.self_mask,
                              "decode attention mask");
    const int slot = kv_.filled;
    decoding_ = false;  // a failed step leaves slot `slot` unknown: decode refuses until the next prefill
    h = run_layers(b, 1, 1, slot, kv_.has_cross, h);
    kv_.filled = slot + 1, ++next_position_;
    HeadOutput out = heads(h, 0, sample);
    decoding_ = true;
    last_decode_ms = ms_since(t0);
    return out;
  }

  // The decode self-attention mask row at cache fill `filled`, by the contract's rule (the
  // definition is mllama_tpu.inputs.decode_self_mask): the filled slots and the new token
  // itself (last column) visible, the rest hidden.
  std::vector<float> decode_self_mask(int filled) const {
    std::vector<float> row(dims.seq + 1, contract_.mask_hidden);
    std::fill(row.begin(), row.begin() + filled, contract_.mask_visible);
    row[dims.seq] = contract_.mask_visible;
    return row;
  }

  // What the device holds for the next decode step's cross layers: (cross mask row, text row).
  std::pair<std::vector<double>, std::vector<double>> decode_cross_masks() {
    require_ready();
    if (!kv_.has_cross) return {};
    return {download(decode_buf_.cross_attention, "decode cross-attention mask"),
            download(decode_buf_.text_rows, "decode text row mask")};
  }

 private:
  // lm_head on row `row` of hidden states `h`, then the greedy or the sampling head.
  HeadOutput heads(const View& h, size_t row, const std::optional<SampleInputs>& sample) {
    const size_t hidden = dims.hidden;
    const DeviceMem& s = stage(*lm_head_, false, 0);
    copy(h, row * hidden, s.mem(), lm_head_->in_dtype(0), 0, hidden, "last hidden state into lm_head");
    const View logits = launch(*lm_head_, {{"hidden_states", View{s.mem(), lm_head_->in_dtype(0), hidden}}})[0];
    HeadOutput out;
    if (!sample) {
      const View tok = launch(*greedy_head_, {{"logits", logits}})[0];
      out.token = static_cast<int>(download(tok, "token of greedy_head")[0]);
      return out;
    }
    Net& n = *sample_head_;
    const auto o = launch(n, {{"logits", logits},
                              {"recent_ids", upload_input(n, "recent_ids", sample->recent_ids.data(), sample->recent_ids.size())},
                              {"top_p", upload_input(n, "top_p", &sample->top_p, 1)},
                              {"temperature", upload_input(n, "temperature", &sample->temperature, 1)},
                              {"repeat_penalty", upload_input(n, "repeat_penalty", &sample->repeat_penalty, 1)}});
    for (double p : download(o[0], "probs of penalty_sample_head")) out.probs.push_back(static_cast<float>(p));
    for (double t : download(o[1], "tokens of penalty_sample_head")) out.tokens.push_back(static_cast<int32_t>(t));
    return out;
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
        std::vector<int> dims_(s.dims, s.dims + s.num_dims);
        py::dict e;
        e["name"] = out ? n.info->output_names[i] : n.info->input_names[i];
        e["shape"] = dims_;
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
// 10. The Python binding
// =========================================================================================

template <typename T>
static std::vector<T> to_vec(const py::handle& o) {
  const auto a = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(o);
  if (!a) throw std::invalid_argument("expected an array");
  return std::vector<T>(a.data(), a.data() + a.size());
}

template <typename T>
static std::optional<std::vector<T>> to_opt_vec(const py::handle& o) {
  if (o.is_none()) return std::nullopt;
  return to_vec<T>(o);
}

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// mllama_tpu.inputs.ChunkInputs, read by its field names.
static Mllama::Chunk chunk_from(const py::object& p) {
  Mllama::Chunk r;
  r.offset = p.attr("offset").cast<int>();
  r.rows = p.attr("rows").cast<int>();
  r.size = p.attr("size").cast<int>();
  r.input_ids = to_vec<int32_t>(p.attr("input_ids"));
  r.position_ids = to_vec<int32_t>(p.attr("position_ids"));
  r.attention_mask = to_vec<float>(p.attr("attention_mask"));
  r.cross_attention_mask = to_opt_vec<float>(p.attr("cross_attention_mask"));
  r.text_row_mask = to_opt_vec<float>(p.attr("text_row_mask"));
  return r;
}

// mllama_tpu.sampling.SampleHeadInputs (or None: greedy), read by its field names.
static std::optional<Mllama::SampleInputs> sample_from(const py::object& s) {
  if (s.is_none()) return std::nullopt;
  Mllama::SampleInputs r;
  r.recent_ids = to_vec<int32_t>(s.attr("recent_ids"));
  r.top_p = to_vec<float>(s.attr("top_p")).at(0);
  r.temperature = to_vec<float>(s.attr("temperature")).at(0);
  r.repeat_penalty = to_vec<float>(s.attr("repeat_penalty")).at(0);
  return r;
}

// mllama_tpu.engines.base.Finish (or None: not the prompt's last chunk), read by its field names.
static std::optional<Mllama::Finish> finish_from(const py::object& f) {
  if (f.is_none()) return std::nullopt;
  Mllama::Finish r;
  r.sample = sample_from(f.attr("head"));
  r.decode_cross_mask = to_opt_vec<float>(f.attr("decode_cross_attention_mask"));
  const auto row = to_opt_vec<float>(f.attr("decode_text_row_mask"));
  if (row && !row->empty()) r.decode_text_row = (*row)[0];
  return r;
}

static py::object head_result(const Mllama::HeadOutput& o) {
  if (o.token >= 0) return py::int_(o.token);
  py::array_t<float> probs(o.probs.size());
  py::array_t<int32_t> tokens(o.tokens.size());
  std::copy(o.probs.begin(), o.probs.end(), probs.mutable_data());
  std::copy(o.tokens.begin(), o.tokens.end(), tokens.mutable_data());
  return py::make_tuple(probs, tokens);
}

// mllama_tpu.contract.engine_spec().
static Contract contract_from(const py::dict& spec) {
  Contract c;
  auto shapes = [](const py::handle& table) {
    std::map<std::string, NetShape> out;
    for (const auto& kv : table.cast<py::dict>()) {
      const auto entry = kv.second.cast<py::sequence>();
      out[kv.first.cast<std::string>()] = NetShape{entry[0].cast<std::vector<std::string>>(), entry[1].cast<int>()};
    }
    return out;
  };
  c.heads = shapes(spec["heads"]);
  c.blocks = shapes(spec["blocks"]);
  c.names = spec["names"].cast<std::map<std::string, std::string>>();
  c.mask_visible = spec["mask_visible"].cast<float>();
  c.mask_hidden = spec["mask_hidden"].cast<float>();
  return c;
}

// The host conversions the engine falls back on when two nets disagree on a dtype, exposed so
// tests can hold them against numpy/torch: f32 values -> dtype -> f32, and the raw 16-bit codes.
static py::tuple host_roundtrip(const F32& values, const std::string& dtype) {
  bm_data_type_t dt;
  if (dtype == "f16") dt = BM_FLOAT16;
  else if (dtype == "bf16") dt = BM_BFLOAT16;
  else if (dtype == "f32") dt = BM_FLOAT32;
  else throw std::invalid_argument("dtype must be f32, f16 or bf16, got '" + dtype + "'");
  const size_t n = static_cast<size_t>(values.size());
  const auto raw = to_device_bytes(values.data(), n, dt);
  const auto back = from_device_bytes(raw.data(), n, dt);
  py::array_t<float> out(n);
  for (size_t i = 0; i < n; ++i) out.mutable_data()[i] = static_cast<float>(back[i]);
  py::array_t<uint16_t> codes(dt == BM_FLOAT32 ? 0 : n);
  if (dt != BM_FLOAT32) std::memcpy(codes.mutable_data(), raw.data(), n * 2);
  return py::make_tuple(out, codes);
}

PYBIND11_MODULE(chat, m) {
  m.doc() = "mllama-tpu engine: Llama-3.2-Vision bmodel on a BM1684X (or its simulator) through libbmrt";
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

  py::class_<Mllama>(m, "Mllama")
      .def(py::init<>())
      .def(
          "init",
          [](Mllama& e, int devid, const std::string& path, const py::dict& contract) {
            const Contract c = contract_from(contract);
            py::gil_scoped_release unlocked;
            e.init(devid, path, c);
          },
          py::arg("devid"), py::arg("bmodel_path"), py::arg("contract"),
          "Open device `devid`, load the bmodel and check it against the contract (mllama_tpu.contract.engine_spec()).")
      .def("deinit", &Mllama::deinit, "Free device memory, the runtime and the device.")
      .def_property_readonly("ready", &Mllama::ready)
      .def_property_readonly("SEQLEN", [](const Mllama& e) { return e.dims.seq; })
      .def_property_readonly("HIDDEN_SIZE", [](const Mllama& e) { return e.dims.hidden; })
      .def_property_readonly("NUM_LAYERS", [](const Mllama& e) { return e.dims.layers; })
      .def_property_readonly("KV_HEADS", [](const Mllama& e) { return e.dims.kv_heads; })
      .def_property_readonly("HEAD_DIM", [](const Mllama& e) { return e.dims.head_dim; })
      .def_property_readonly("MAX_TILES", [](const Mllama& e) { return e.dims.max_tiles; })
      .def_property_readonly("NUM_PATCHES", [](const Mllama& e) { return e.dims.patches; })
      .def_property_readonly("TILE_SIZE", [](const Mllama& e) { return e.dims.tile_size; })
      .def_property_readonly("VOCAB_SIZE", [](const Mllama& e) { return e.dims.vocab; })
      .def_property_readonly("SAMPLE_K", [](const Mllama& e) { return e.dims.sample_k; })
      .def_property_readonly("RECENT_IDS", [](const Mllama& e) { return e.dims.recent_ids; })
      .def_property_readonly("PREFILL_LENGTHS", [](const Mllama& e) { return e.dims.prefill_lengths; })
      .def_readonly("cross_layers", &Mllama::cross_layers)
      .def_readonly("last_vit_ms", &Mllama::last_vit_ms)
      .def_readonly("last_prefill_ms", &Mllama::last_prefill_ms)
      .def_readonly("last_decode_ms", &Mllama::last_decode_ms)
      .def_property_readonly("position", &Mllama::position)
      .def(
          "encode_image",
          [](Mllama& e, const F32& pixel_values, const I32& aspect_ratio_ids, const I32& aspect_ratio_mask) {
            auto pv = to_vec<float>(pixel_values);
            auto ids = to_vec<int32_t>(aspect_ratio_ids);
            auto am = to_vec<int32_t>(aspect_ratio_mask);
            py::gil_scoped_release unlocked;
            e.encode_image(pv, ids, am);
          },
          py::arg("pixel_values"), py::arg("aspect_ratio_ids"), py::arg("aspect_ratio_mask"),
          "Run the vision encoder; its output stays in device memory for the next prefills.")
      .def(
          "prefill_chunk",
          [](Mllama& e, const py::object& chunk, const py::object& finish) {
            const Mllama::Chunk c = chunk_from(chunk);
            const auto f = finish_from(finish);
            Mllama::HeadOutput o;
            {
              py::gil_scoped_release unlocked;
              o = e.prefill_chunk(c, f);
            }
            return f ? head_result(o) : py::none();
          },
          py::arg("chunk"), py::arg("finish") = py::none(),
          "Run a ChunkInputs against the cache; with a Finish (the prompt's last chunk) returns greedy_head's "
          "token, or penalty_sample_head's (probs, tokens). No cross mask: text-only (cross layers skipped).")
      .def(
          "decode",
          [](Mllama& e, int token, const py::object& sample) {
            const auto s = sample_from(sample);
            Mllama::HeadOutput o;
            {
              py::gil_scoped_release unlocked;
              o = e.decode(token, s);
            }
            return head_result(o);
          },
          py::arg("token"), py::arg("sample") = py::none(), "Feed the last token; returns as prefill.")
      .def("decode_self_mask", &Mllama::decode_self_mask, py::arg("filled"),
           "The self-attention mask row decode uploads when `filled` cache slots hold tokens.")
      .def("decode_cross_masks", &Mllama::decode_cross_masks,
           "(cross mask row, text row) the device holds for the next decode step; empty without an image.")
      .def("memory_info", &Mllama::memory_info)
      .def("net_io", &Mllama::net_io, py::arg("name"))
      .def("net_stats", &Mllama::net_stats, py::arg("reset") = false,
           "{net: (launches, total ms)}: where device time goes (profiling, benchmarks).")
      .def("net_names", &Mllama::net_names);
  m.def("host_roundtrip", &host_roundtrip, py::arg("values"), py::arg("dtype"),
        "f32 values through the engine's host conversion to dtype and back: (values, 16-bit codes).");
}
