/* Decode only a crop box of a JPEG, at 1/denom scale, with libjpeg-turbo's scanline API.
 *
 * A random-resized crop needs the pixels of its box only: rows above the box are skipped without
 * their IDCT and colour conversion (jpeg_skip_scanlines), rows below it are never decoded, and
 * columns outside the box (rounded out to whole iMCUs) skip their IDCT (jpeg_crop_scanline). The
 * DCT method is libjpeg's fast integer IDCT, the one ffcv's turbojpeg decoder uses (TJFLAG_FASTDCT),
 * with fancy upsampling, turbojpeg's default. Built by the Makefile into _jpegcrop.so and called
 * from the loader's numba code through ctypes; the loader falls back to ffcv's full decode when
 * the library is missing or this returns an error.
 *
 * Skipped rows and columns still cost their Huffman decoding, the larger part of a decode: the
 * entropy-coded data has no index. A baseline JPEG with restart markers does (prepare writes one every
 * `prepare.jpeg_restart_interval` MCUs): each restart interval is coded on its own, so the box's
 * intervals, with one interval more where the box comes within CONTEXT pixels of their edge (fancy
 * upsampling reads a neighbouring chroma sample), are copied into a smaller JPEG whose frame header
 * says its new size, and only that one is decoded. Its pixels are the same as the whole file's.
 */
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>

struct error_jump {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
};

static void jump_on_error(j_common_ptr cinfo) {
  longjmp(((struct error_jump *)cinfo->err)->jump, 1);
}

static void no_output(j_common_ptr cinfo) { (void)cinfo; }

/* Regions decoded by this process, and those of them cut from restart intervals: the tests' proof
 * that the loader calls this library and takes the restart path. */
static uint64_t decoded_regions = 0, interval_regions = 0;

uint64_t crop_decode_count(void) { return __atomic_load_n(&decoded_regions, __ATOMIC_RELAXED); }

uint64_t crop_decode_interval_count(void) { return __atomic_load_n(&interval_regions, __ATOMIC_RELAXED); }

/* Scaled pixels of context a box needs beyond its edge: fancy upsampling of 2x-subsampled chroma reads
 * the next chroma sample, so a box edge on an MCU's first or last pixel needs the next MCU (the tests
 * fail with 0 and pass with 1); 2 leaves a pixel to spare. */
enum { CONTEXT = 2 };

/* Where a baseline, single-scan JPEG keeps what the restart path needs; read_layout fills it or fails. */
struct layout {
  size_t sof;           /* offset of the SOF0/SOF1 marker */
  size_t data;          /* first byte of the entropy-coded data */
  unsigned height, width, mcu_h, mcu_w;
  unsigned interval;    /* MCUs per restart interval, 0: no restart markers */
};

static unsigned be16(const uint8_t *p) { return (unsigned)p[0] << 8 | p[1]; }

static int read_layout(const uint8_t *src, size_t size, struct layout *out) {
  unsigned components = 0, h_max = 1, v_max = 1;
  size_t i = 2;
  memset(out, 0, sizeof(*out));
  if (size < 4 || src[0] != 0xFF || src[1] != 0xD8) return -1;
  while (i + 4 <= size) {
    if (src[i] != 0xFF) return -1;
    const uint8_t marker = src[i + 1];
    if (marker == 0xFF) { i++; continue; }  /* fill byte */
    const size_t length = be16(src + i + 2);
    if (length < 2 || i + 2 + length > size) return -1;
    const uint8_t *body = src + i + 4;
    if (marker == 0xC0 || marker == 0xC1) {
      if (length < 8) return -1;
      components = body[5];
      if ((components != 1 && components != 3) || length < 8 + 3 * components) return -1;
      out->sof = i;
      out->height = be16(body + 1);
      out->width = be16(body + 3);
      for (unsigned c = 0; c < components; c++) {
        const unsigned h = body[7 + 3 * c] >> 4, v = body[7 + 3 * c] & 15;
        if (h > h_max) h_max = h;
        if (v > v_max) v_max = v;
      }
    } else if (marker >= 0xC2 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC) {
      return -1;  /* progressive, lossless or arithmetic-coded */
    } else if (marker == 0xDD) {
      if (length != 4) return -1;
      out->interval = be16(body);
    } else if (marker == 0xDA) {
      /* one scan with every component: an MCU is 8 h_max x 8 v_max pixels (a single component: 8 x 8) */
      if (!out->sof || length < 3 || body[0] != components || out->height == 0 || out->width == 0) return -1;
      out->mcu_h = components == 1 ? 8 : 8 * v_max;
      out->mcu_w = components == 1 ? 8 : 8 * h_max;
      out->data = i + 2 + length;
      return 0;
    }
    i += 2 + length;
  }
  return -1;
}

/* Offsets [start[k], end[k]) of restart intervals 0 .. count - 1; -1 when the data ends first or the
 * markers are not RST0..7 in turn. */
static int find_intervals(const uint8_t *src, size_t size, size_t data, unsigned count, size_t *start,
                          size_t *end) {
  size_t p = data;
  unsigned k = 0;
  start[0] = data;
  while (k < count) {
    if (p + 1 >= size) return -1;
    const uint8_t *ff = memchr(src + p, 0xFF, size - 1 - p);
    if (ff == NULL) return -1;
    const size_t q = (size_t)(ff - src);
    const uint8_t next = src[q + 1];
    if (next == 0x00 || next == 0xFF) {  /* a stuffed 0xFF, or a fill byte before a marker */
      p = q + 1 + (next == 0x00);
      continue;
    }
    if (next == 0xD9 && k + 1 == count) {  /* EOI ends the last interval */
      end[k] = q;
      return 0;
    }
    if (next < 0xD0 || next > 0xD7 || (next & 7) != (k & 7)) return -1;
    end[k] = q;
    if (++k < count) start[k] = q + 2;
    p = q + 2;
  }
  return 0;
}

static int decode_region(const uint8_t *src, uint64_t size, uint8_t *dst, int32_t denom, int32_t top,
                         int32_t left, int32_t height, int32_t width, int64_t *region) {
  struct jpeg_decompress_struct cinfo;
  struct error_jump err;
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = jump_on_error;
  err.pub.output_message = no_output;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, src, (unsigned long)size);
  jpeg_read_header(&cinfo, TRUE);
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = 1;
  cinfo.scale_denom = (unsigned int)denom;
  cinfo.dct_method = JDCT_IFAST;
  jpeg_start_decompress(&cinfo);
  if (top < 0 || left < 0 || height < 1 || width < 1 || (JDIMENSION)(top + height) > cinfo.output_height ||
      (JDIMENSION)(left + width) > cinfo.output_width) {
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  JDIMENSION x0 = (JDIMENSION)left, w0 = (JDIMENSION)width;
  if (w0 < cinfo.output_width) jpeg_crop_scanline(&cinfo, &x0, &w0);
  if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
  const size_t stride = (size_t)cinfo.output_width * 3;
  while (cinfo.output_scanline < (JDIMENSION)(top + height)) {
    JSAMPROW row = dst + (size_t)(cinfo.output_scanline - (JDIMENSION)top) * stride;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  region[0] = (int64_t)x0;
  region[1] = (int64_t)cinfo.output_width;
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return 0;
}

/* The box through the restart intervals that hold it: 0, -1 on a decode error, 1 when the file has
 * no usable restart markers (the caller then decodes the whole file's region). */
static int decode_by_intervals(const uint8_t *src, uint64_t size, uint8_t *dst, int32_t denom, int32_t top,
                               int32_t left, int32_t height, int32_t width, int64_t *region) {
  struct layout L;
  if (read_layout(src, (size_t)size, &L) != 0 || L.interval == 0) return 1;
  const unsigned per_row = (L.width + L.mcu_w - 1) / L.mcu_w, rows = (L.height + L.mcu_h - 1) / L.mcu_h;
  if (per_row % L.interval != 0 || top < 0 || left < 0 || height < 1 || width < 1) return 1;
  if (denom < 1 || L.mcu_h % (unsigned)denom != 0 || L.mcu_w % (unsigned)denom != 0) return 1;  /* not 1/2/4/8 */
  /* the box in scaled pixels, against intervals of seg_w x unit_h scaled pixels */
  const unsigned cols = per_row / L.interval, unit_h = L.mcu_h / (unsigned)denom;
  const unsigned seg_w = L.interval * L.mcu_w / (unsigned)denom;
  const unsigned y0 = (unsigned)top, y1 = (unsigned)(top + height), x0 = (unsigned)left, x1 = (unsigned)(left + width);
  unsigned r0 = y0 / unit_h, r1 = (y1 + unit_h - 1) / unit_h, c0 = x0 / seg_w, c1 = (x1 + seg_w - 1) / seg_w;
  if (r1 > rows || c1 > cols) return -1;  /* the box lies outside the image */
  if (r0 > 0 && y0 - r0 * unit_h < CONTEXT) r0--;
  if (r1 < rows && r1 * unit_h - y1 < CONTEXT) r1++;
  if (c0 > 0 && x0 - c0 * seg_w < CONTEXT) c0--;
  if (c1 < cols && c1 * seg_w - x1 < CONTEXT) c1++;
  if (r0 == 0 && r1 == rows && c0 == 0 && c1 == cols) return 1;  /* the whole image: nothing to cut */

  const unsigned needed = r1 * cols;
  size_t *bounds = malloc(2 * (size_t)needed * sizeof(size_t));
  if (bounds == NULL) return 1;
  size_t *start = bounds, *end = bounds + needed;
  int status = 1;
  if (find_intervals(src, (size_t)size, L.data, needed, start, end) != 0) goto done;
  /* header, then each chosen interval with a restart marker after it, numbered anew, then EOI */
  const size_t body = end[needed - 1] - start[r0 * cols];
  uint8_t *cut = malloc(L.data + body + 2 * (size_t)(r1 - r0) * (c1 - c0) + 2);
  if (cut == NULL) goto done;
  memcpy(cut, src, L.data);
  const unsigned new_h = r1 < rows ? (r1 - r0) * L.mcu_h : L.height - r0 * L.mcu_h;
  const unsigned new_w = c1 < cols ? (c1 - c0) * L.interval * L.mcu_w : L.width - c0 * L.interval * L.mcu_w;
  cut[L.sof + 5] = (uint8_t)(new_h >> 8), cut[L.sof + 6] = (uint8_t)new_h;
  cut[L.sof + 7] = (uint8_t)(new_w >> 8), cut[L.sof + 8] = (uint8_t)new_w;
  size_t n = L.data;
  unsigned k = 0;
  for (unsigned r = r0; r < r1; r++) {
    for (unsigned c = c0; c < c1; c++, k++) {
      const size_t s = start[r * cols + c], e = end[r * cols + c];
      memcpy(cut + n, src + s, e - s);
      n += e - s;
      cut[n++] = 0xFF;
      cut[n++] = (uint8_t)(0xD0 + (k & 7));
    }
  }
  cut[n - 1] = 0xD9;  /* the last marker becomes EOI */
  status = decode_region(cut, n, dst, denom, top - (int32_t)(r0 * unit_h), left - (int32_t)(c0 * seg_w), height,
                         width, region);
  if (status == 0) {
    region[0] += (int64_t)(c0 * seg_w);
    __atomic_add_fetch(&interval_regions, 1, __ATOMIC_RELAXED);
  }
  free(cut);
done:
  free(bounds);
  return status;
}

/* Rows [top, top + height) and at least columns [left, left + width) of the image scaled by
 * 1/denom (denom 1, 2, 4 or 8; scaled sides are rounded up), RGB, written to dst with a row
 * stride of 3 * region[1] bytes. region receives the first decoded column and the decoded width.
 * Returns 0, or -1 when libjpeg reports an error or the box lies outside the scaled image.
 */
int crop_decode(const uint8_t *src, uint64_t size, uint8_t *dst, int32_t denom, int32_t top,
                int32_t left, int32_t height, int32_t width, int64_t *region) {
  int status = decode_by_intervals(src, size, dst, denom, top, left, height, width, region);
  if (status == 1) status = decode_region(src, size, dst, denom, top, left, height, width, region);
  if (status == 0) __atomic_add_fetch(&decoded_regions, 1, __ATOMIC_RELAXED);
  return status;
}
