/* LD_PRELOAD helper for the BM1684X simulator (cmodel builds only; never on a chip).
 *
 * The simulator runs each engine of the chip (TIU, GDMA, firmware core, ...) as a thread that
 * polls shared registers in a tight pthread_mutex_lock/unlock loop. Seven such threads per
 * process on a 2-core machine starve the one thread that has work: measured with perf, 99 %
 * of the simulator's CPU went to the mutex calls and a tiny net took ~1 s per launch.
 *
 * Here pthread_mutex_unlock does what libc's does, then, when the caller is code of
 * libcmodel, gives the core away (sched_yield), so a polling thread stops eating the time
 * slice of the thread it waits for. Nothing the simulator computes changes; callers outside
 * libcmodel (Python, the compiler, anything else the preload reaches) are untouched apart from
 * one counter increment per unlock until libcmodel has been found.
 *
 * Yielding alone still keeps both cores busy while the device is idle: a loaded engine that
 * runs no net (a server between requests, a chat waiting for its user, a test's module-scoped
 * engine while other tests run) spun them in sched_yield, taking them from every other process.
 * Nothing the polling threads do tells idle from busy (their polls look the same either way), so
 * the engine says it: chat.cpp calls cmodel_yield_device_use(+1/-1) around each call that uses
 * the device (ARCHITECTURE.md, "The simulator"). While no call is in flight, polling threads
 * sleep IDLE_SLEEP_NS between polls; a new call waits at most that long for them to wake.
 * A process whose engine never calls it (a compile's model_runner) keeps yielding always.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef int (*unlock_fn)(pthread_mutex_t *);

static unlock_fn real_unlock;
static uintptr_t cmodel_lo, cmodel_hi; /* libcmodel's executable segment, once loaded */
static unsigned long unlocks_before_found;

enum { IDLE_SLEEP_NS = 1000 * 1000 };   /* a polling thread's pause while the device is idle */
static int device_managed;  /* set once an engine reports its device use */
static int device_users;    /* engine calls now using the device */

void cmodel_yield_device_use(int delta) {
    __atomic_store_n(&device_managed, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&device_users, delta, __ATOMIC_RELEASE);
}

/* The caller, a libcmodel thread, just polled: give the core away, or pause while nobody uses the device. */
static void after_poll(void) {
    if (!__atomic_load_n(&device_managed, __ATOMIC_RELAXED) || __atomic_load_n(&device_users, __ATOMIC_ACQUIRE) > 0) {
        sched_yield();
        return;
    }
    struct timespec pause = {0, IDLE_SLEEP_NS};
    nanosleep(&pause, NULL);
}

static int find_cmodel_text(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    (void)data;
    if (!info->dlpi_name || !strstr(info->dlpi_name, "libcmodel")) return 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_LOAD && (ph->p_flags & PF_X)) {
            uintptr_t lo = info->dlpi_addr + ph->p_vaddr;
            uintptr_t self = (uintptr_t)&find_cmodel_text;
            if (self >= lo && self < lo + ph->p_memsz) return 0; /* our own name has "libcmodel" too */
            __atomic_store_n(&cmodel_lo, lo, __ATOMIC_RELAXED);
            __atomic_store_n(&cmodel_hi, lo + ph->p_memsz, __ATOMIC_RELEASE);
            return 1;
        }
    }
    return 0;
}

int pthread_mutex_unlock(pthread_mutex_t *mutex) {
    unlock_fn unlock = __atomic_load_n(&real_unlock, __ATOMIC_ACQUIRE);
    if (!unlock) {
        unlock = (unlock_fn)dlsym(RTLD_NEXT, "pthread_mutex_unlock");
        __atomic_store_n(&real_unlock, unlock, __ATOMIC_RELEASE);
    }
    int rc = unlock(mutex);

    uintptr_t hi = __atomic_load_n(&cmodel_hi, __ATOMIC_ACQUIRE);
    if (!hi) {
        /* libcmodel is dlopen'ed late (by bmlib, at device request): look for it now and then. */
        if ((__atomic_add_fetch(&unlocks_before_found, 1, __ATOMIC_RELAXED) & 4095) == 0)
            dl_iterate_phdr(find_cmodel_text, NULL);
        return rc;
    }
    uintptr_t caller = (uintptr_t)__builtin_return_address(0);
    if (caller >= __atomic_load_n(&cmodel_lo, __ATOMIC_RELAXED) && caller < hi) after_poll();
    return rc;
}
