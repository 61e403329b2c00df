/* Decode only a crop box of a JPEG, at 1/denom scale, with libjpeg-turbo's scanline API.
 *
 * A random-resized crop needs the pixels of its box only: rows above the box are skipped without
 * their IDCT and colour conversion (jpeg_skip_scanlines), rows below it are never decoded, and
 * columns outside the box (rounded out to whole iMCUs) skip their IDCT (jpeg_crop_scanline). The
 * DCT method is libjpeg's fast integer IDCT, the one ffcv's turbojpeg decoder uses (TJFLAG_FASTDCT),
 * with fancy upsampling, turbojpeg's default. Built by the Makefile into _jpegcrop.so and called
 * from the loader's numba code through ctypes; the loader falls back to ffcv's full decode when
 * the library is missing or this returns an error.
 */
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <jpeglib.h>

struct error_jump {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
};

static void jump_on_error(j_common_ptr cinfo) {
  longjmp(((struct error_jump *)cinfo->err)->jump, 1);
}

static void no_output(j_common_ptr cinfo) { (void)cinfo; }

/* Regions decoded by this process: the tests' proof that the loader calls this library. */
static uint64_t decoded_regions = 0;

uint64_t crop_decode_count(void) { return __atomic_load_n(&decoded_regions, __ATOMIC_RELAXED); }

/* Rows [top, top + height) and at least columns [left, left + width) of the image scaled by
 * 1/denom (denom 1, 2, 4 or 8; scaled sides are rounded up), RGB, written to dst with a row
 * stride of 3 * region[1] bytes. region receives the first decoded column and the decoded width.
 * Returns 0, or -1 when libjpeg reports an error or the box lies outside the scaled image.
 */
int crop_decode(const uint8_t *src, uint64_t size, uint8_t *dst, int32_t denom, int32_t top,
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
  __atomic_add_fetch(&decoded_regions, 1, __ATOMIC_RELAXED);
  return 0;
}
