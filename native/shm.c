/*
 * nimble_shm: the shared buffer between a provider and its worker (src/runtime/sharedBuffer.ts).
 *
 * A worker's large all-reduces travel through memory both processes map instead of the
 * worker link's socket: the provider makes an anonymous memory file (memfd_create), the
 * worker inherits it as fd 4, writes its buffer there and asks for the all-reduce; the
 * provider's collective runs on a Float32Array over the same pages, and the sum is where the
 * worker reads it. Node cannot map a file itself, hence this addon: four calls.
 *
 *   create(name) -> fd      memfd_create(MFD_CLOEXEC | MFD_ALLOW_SEALING), sealed against
 *                           shrinking: a mapping of bytes the worker once had can never lose
 *                           them (a shrunk file would raise SIGBUS in the provider).
 *   size(fd) -> bytes       fstat
 *   map(fd, bytes) -> ArrayBuffer   MAP_SHARED read-write; unmapped when collected
 *   close(fd)
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif
#ifndef MFD_ALLOW_SEALING
#define MFD_ALLOW_SEALING 0x0002U
#endif

static napi_value fail(napi_env env, const char *what) {
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(errno));
  napi_throw_error(env, NULL, msg);
  return NULL;
}

static int arg_int64(napi_env env, napi_callback_info info, size_t want, napi_value *argv, int64_t *out) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, NULL, "missing argument");
    return 0;
  }
  for (size_t i = 0; i < want; i++) {
    if (napi_get_value_int64(env, argv[i], &out[i]) != napi_ok) {
      napi_throw_type_error(env, NULL, "expected a number");
      return 0;
    }
  }
  return 1;
}

static napi_value create(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  char name[64] = "nimble-shm";
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc >= 1) {
    size_t len;
    napi_get_value_string_utf8(env, argv[0], name, sizeof name, &len);
  }
  int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return fail(env, "memfd_create");
  if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
    int saved = errno;
    close(fd);
    errno = saved;
    return fail(env, "sealing the shared buffer");
  }
  napi_value out;
  napi_create_int32(env, fd, &out);
  return out;
}

static napi_value size(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int64_t a[1];
  if (!arg_int64(env, info, 1, argv, a)) return NULL;
  struct stat st;
  if (fstat((int)a[0], &st) != 0) return fail(env, "fstat");
  napi_value out;
  napi_create_int64(env, (int64_t)st.st_size, &out);
  return out;
}

static void unmap(napi_env env, void *data, void *hint) {
  (void)env;
  munmap(data, (size_t)(uintptr_t)hint);
}

static napi_value map(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t a[2];
  if (!arg_int64(env, info, 2, argv, a)) return NULL;
  int fd = (int)a[0];
  int64_t bytes = a[1];
  napi_value out;
  if (bytes <= 0) {
    void *none;
    napi_create_arraybuffer(env, 0, &none, &out);
    return out;
  }
  struct stat st;
  if (fstat(fd, &st) != 0) return fail(env, "fstat");
  if (st.st_size < bytes) {
    errno = EINVAL;
    return fail(env, "the shared buffer is smaller than the mapping asked for");
  }
  void *p = mmap(NULL, (size_t)bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return fail(env, "mmap");
  if (napi_create_external_arraybuffer(env, p, (size_t)bytes, unmap, (void *)(uintptr_t)bytes, &out) != napi_ok) {
    munmap(p, (size_t)bytes);
    napi_throw_error(env, NULL, "could not make an ArrayBuffer of the mapping");
    return NULL;
  }
  return out;
}

static napi_value close_fd(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int64_t a[1];
  if (!arg_int64(env, info, 1, argv, a)) return NULL;
  if (close((int)a[0]) != 0) return fail(env, "close");
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"create", NULL, create, NULL, NULL, NULL, napi_default, NULL},
      {"size", NULL, size, NULL, NULL, NULL, napi_default, NULL},
      {"map", NULL, map, NULL, NULL, NULL, napi_default, NULL},
      {"close", NULL, close_fd, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
