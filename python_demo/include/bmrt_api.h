// The subset of the libbmrt (BMRuntime) C API that chat.cpp uses.
//
// Why our own declarations: the tpu-mlir wheel ships libbmrt.so (which runs bmodels on the
// BM1684X simulator) and bmlib_runtime.h, but not bmruntime_interface.h. With libsophon
// installed (a real PCIe card or SoC) CMake defines MLLAMA_SYSTEM_BMRT and its own header is
// used instead, so these declarations only have to agree with the library's public ABI:
// the enum values and struct layouts below follow the documented libsophon / tpu-mlir
// bmruntime headers (bmdef.h, bmruntime_interface.h) field for field.
#pragma once

#include "bmlib_runtime.h"  // bm_handle_t, bm_device_mem_t, bm_status_t, bm_memcpy_*, ...

#ifdef MLLAMA_SYSTEM_BMRT
#include "bmruntime_interface.h"
#else

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of a tensor (values fixed by the ABI).
typedef enum bm_data_type_e {
  BM_FLOAT32 = 0,
  BM_FLOAT16 = 1,
  BM_INT8 = 2,
  BM_UINT8 = 3,
  BM_INT16 = 4,
  BM_UINT16 = 5,
  BM_INT32 = 6,
  BM_UINT32 = 7,
  BM_BFLOAT16 = 8,
  BM_INT4 = 9,
  BM_UINT4 = 10,
} bm_data_type_t;

// How elements are packed in device memory; everything here is the plain 1N layout.
typedef enum bm_store_mode_e {
  BM_STORE_1N = 0,
  BM_STORE_2N = 1,
  BM_STORE_4N = 2,
} bm_store_mode_t;

#define BM_MAX_DIMS_NUM 8
typedef struct bm_shape_s {
  int num_dims;
  int dims[BM_MAX_DIMS_NUM];
} bm_shape_t;

// A tensor whose data lives in device memory.
typedef struct bm_tensor_s {
  bm_data_type_t dtype;
  bm_shape_t shape;
  bm_device_mem_t device_mem;
  bm_store_mode_t st_mode;
} bm_tensor_t;

// Input and output shapes of one compiled stage of a net (static nets have one stage).
typedef struct bm_stage_info_s {
  bm_shape_t* input_shapes;
  bm_shape_t* output_shapes;
} bm_stage_info_t;

// Everything the runtime knows about one net; owned by the runtime, never freed by us.
typedef struct bm_net_info_s {
  const char* name;
  bool is_dynamic;
  int input_num;
  char const** input_names;
  bm_data_type_t* input_dtypes;
  float* input_scales;
  int output_num;
  char const** output_names;
  bm_data_type_t* output_dtypes;
  float* output_scales;
  int stage_num;
  bm_stage_info_t* stages;
  size_t* max_input_bytes;
  size_t* max_output_bytes;
  int* input_zero_point;
  int* output_zero_point;
} bm_net_info_t;

size_t bmrt_data_type_size(bm_data_type_t dtype);
uint64_t bmrt_shape_count(const bm_shape_t* shape);

void* bmrt_create(bm_handle_t bm_handle);
void bmrt_destroy(void* p_bmrt);
bool bmrt_load_bmodel(void* p_bmrt, const char* bmodel_path);

int bmrt_get_network_number(void* p_bmrt);
// *network_names is malloc'ed by the runtime; the caller free()s the array (not the strings).
void bmrt_get_network_names(void* p_bmrt, const char*** network_names);
// NULL when no net has that name.
const bm_net_info_t* bmrt_get_network_info(void* p_bmrt, const char* net_name);

// Asynchronous: returns once the work is queued; bm_thread_sync waits for it.
// user_mem = true: the outputs go to the device memory already set in output_tensors.
bool bmrt_launch_tensor_ex(void* p_bmrt, const char* net_name, const bm_tensor_t input_tensors[],
                           int input_num, bm_tensor_t output_tensors[], int output_num,
                           bool user_mem, bool user_stmode);

#ifdef __cplusplus
}
#endif

#endif  // MLLAMA_SYSTEM_BMRT
