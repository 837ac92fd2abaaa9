/* Test-only LD_PRELOAD: device faults at libbmrt's boundary (tests/test_faults.py builds it).
 *
 * Interposes bmrt_launch_tensor_ex. FAIL_LAUNCH="net:N[,net:N...]" makes the N-th launch
 * (1-based, counted per net) of each named net return false without running, as libbmrt does
 * when the device refuses a launch. HANG_LAUNCH (same form) makes those launches never return,
 * as a hung device would: a kill -9 then lands in the middle of a turn, not after it. Every
 * other call goes to the real function.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef bool (*launch_fn)(void *, const char *, const void *, int, void *, int, bool, bool);

enum { MAX_NETS = 64 };
static struct { char name[128]; long launches; } counts[MAX_NETS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static launch_fn real_launch(void) {
  static launch_fn real;
  if (!real) real = (launch_fn)dlsym(RTLD_NEXT, "bmrt_launch_tensor_ex");
  if (!real) {
    /* libbmrt came in with the Python extension (dlopen, local scope): ask it by its soname. */
    void *lib = dlopen("libbmrt.so.1.0", RTLD_LAZY | RTLD_NOLOAD);
    if (lib) real = (launch_fn)dlsym(lib, "bmrt_launch_tensor_ex");
  }
  if (!real) {
    fprintf(stderr, "fail_launch: the real bmrt_launch_tensor_ex is not loaded\n");
    abort();
  }
  return real;
}

/* This launch's number for `net` (1-based). */
static long count_launch(const char *net) {
  long n = 0;
  pthread_mutex_lock(&lock);
  for (int i = 0; i < MAX_NETS; ++i) {
    if (!counts[i].name[0]) snprintf(counts[i].name, sizeof counts[i].name, "%s", net);
    if (strcmp(counts[i].name, net) == 0) {
      n = ++counts[i].launches;
      break;
    }
  }
  pthread_mutex_unlock(&lock);
  return n;
}

/* Whether the plan in env var `var` names launch `n` of `net`. */
static bool planned(const char *var, const char *net, long n) {
  const char *plan = getenv(var);
  size_t len = strlen(net);
  for (const char *p = plan; p && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL)
    if (strncmp(p, net, len) == 0 && p[len] == ':' && atol(p + len + 1) == n) return true;
  return false;
}

bool bmrt_launch_tensor_ex(void *rt, const char *net, const void *in, int ni, void *out, int no,
                           bool user_mem, bool user_stmode) {
  const long n = count_launch(net);
  if (planned("FAIL_LAUNCH", net, n)) {
    fprintf(stderr, "fail_launch: failing launch %ld of net '%s'\n", n, net);
    return false;
  }
  if (planned("HANG_LAUNCH", net, n)) {
    fprintf(stderr, "fail_launch: hanging in launch %ld of net '%s'\n", n, net);
    for (;;) pause();
  }
  return real_launch()(rt, net, in, ni, out, no, user_mem, user_stmode);
}
