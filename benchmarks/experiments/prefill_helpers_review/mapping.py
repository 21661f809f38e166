# SPDX-License-Identifier: Apache-2.0
# Review of prefill-mc-helpers.patch (twenty-third session, CPU only): the A-stage offsets the helper warps
# write against those each consumer warp reads, and the fragments both sides mean.
# helper half-unit u -> (rb, block column, mr, byte offsets) vs consumer warp cw
ok = True
stores = {}
for u in range(16):
    h, cb = u >> 1, u & 1
    rb_h = 2 * (h >> 2) + ((h & 3) >> 1); mr_h = h & 1
    for kc in range(2):
        for lane in range(32):
            off = ((h * 4 + 2 * cb) * 32 + lane) * 16 + kc * 32 * 16
            assert off not in stores; stores[off] = (u, kc, lane, rb_h, cb, mr_h)
assert sorted(stores) == list(range(0, 8 * 4 * 32 * 16, 16))
for cw in range(8):
    wg, w4 = cw >> 2, cw & 3
    rb, mr = 2 * wg + (w4 >> 1), w4 & 1
    for kk in range(4):
        for lane in range(32):
            off = (cw * 4 * 32 + lane) * 16 + kk * 32 * 16
            u, kc, l, rb_h, cb, mr_h = stores[off]
            # consumer: af[kk>>1][kk&1] = decode_half(w[cb=kk>>1], mr)[kc=kk&1]
            ok &= (u >> 1 == cw and cb == kk >> 1 and kc == kk & 1 and l == lane
                   and rb_h == rb and mr_h == mr)
print("mapping ok:", ok, "stage bytes", len(stores) * 16)
