/* afrelay: splice(2) both ways between two sockets until both directions end. */
#ifndef AFRELAY_H
#define AFRELAY_H
#include <stdint.h>

/* Returns 0, or -errno of the first error (the relay ended early); the byte
 * counts moved each way are stored either way. Blocks; call without the GIL. */
int afr_relay(int a, int b, uint64_t *a_to_b, uint64_t *b_to_a);

#endif
