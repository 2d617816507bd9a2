/* digest.c built again with AVX2 on: xxHash picks its AVX2 code by the compiler's target where it is
 * included, and digest.c's public functions call these where the CPU has AVX2. */
#pragma GCC target("avx2")
#define DIGEST(name) name##_avx2
#include "digest.c"
