// qref TYPE_ID N_PER_ROW < f32 input > quantized output (ggml_quantize_chunk)
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"
int main(int argc, char **argv) {
    int t = atoi(argv[1]); long npr = atol(argv[2]);
    size_t cap = 1<<20, n = 0; float *x = malloc(cap*4);
    size_t r;
    while ((r = fread(x+n, 4, cap-n, stdin)) > 0) { n += r; if (n == cap) { cap *= 2; x = realloc(x, cap*4);} }
    long nrows = n / npr;
    size_t sz = ggml_row_size(t, npr) * nrows;
    void *out = malloc(sz);
    ggml_quantize_init(t);
    size_t w = ggml_quantize_chunk(t, x, out, 0, nrows, npr, NULL);
    fwrite(out, 1, w, stdout);
    return 0;
}
