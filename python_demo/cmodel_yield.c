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
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>

typedef int (*unlock_fn)(pthread_mutex_t *);

static unlock_fn real_unlock;
static uintptr_t cmodel_lo, cmodel_hi; /* libcmodel's executable segment, once loaded */
static unsigned long unlocks_before_found;

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
    if (caller >= __atomic_load_n(&cmodel_lo, __ATOMIC_RELAXED) && caller < hi) sched_yield();
    return rc;
}
