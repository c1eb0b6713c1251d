// A TensorFlow op for benchmarks/jpeg_decode_alternatives.py only (not part of the package): decodes
// the same `[y, x, h, w]` window of every JPEG of a clip at a DCT-domain scale of `scale_eighths`/8,
// the libjpeg feature TF's decode ops do not expose (they offer 1/1, 1/2, 1/4 and 1/8 only).
//
// Question it answers (issue #17, docs/pipeline.md "Tried for 2x"): 256-px frames resized to a short
// side of 224 is exactly 7/8, so decoding at 7/8 could replace "decode the window + bilinear resize".
//
//   contents [T] string, window [4] int32 in the SCALED frame's pixels, scale_eighths int32 (1..16)
//   -> frames [T, h, w, 3] uint8
//
// The decoder settings are TF's decode_jpeg defaults (integer fast IDCT, fancy upsampling), so at
// scale 8/8 the output equals tf.io.decode_and_crop_jpeg's (the benchmark checks this).
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

extern "C" {
#include <jerror.h>
#include <jpeglib.h>
}

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

REGISTER_OP("DecodeJpegScaledWindow")
    .Input("contents: string")
    .Input("window: int32")
    .Input("scale_eighths: int32")
    .Output("frames: uint8")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->MakeShape({c->Dim(c->input(0), 0), c->UnknownDim(), c->UnknownDim(), 3}));
      return ::tensorflow::OkStatus();
    });

// libjpeg reports fatal errors through error_exit, which must not return: jump back to DecodeWindow.
struct ErrorManager {
  jpeg_error_mgr pub;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
  bool truncated;
};

void ExitWithMessage(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<ErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

// A truncated file is only a warning to libjpeg (it pads with grey); TF's decoder rejects it, so do we.
void NoteWarning(j_common_ptr cinfo, int level) {
  auto* err = reinterpret_cast<ErrorManager*>(cinfo->err);
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) err->truncated = true;
}

// Decodes rows [y, y+h) and columns [x, x+w) of the frame scaled by scale/8 into `out` (h*w*3 bytes).
// Returns "" on success, else why not.
std::string DecodeWindow(const ::tensorflow::tstring& bytes, int scale, int y, int x, int h, int w,
                         uint8_t* out) {
  jpeg_decompress_struct cinfo;
  ErrorManager err;
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = ExitWithMessage;
  err.pub.emit_message = NoteWarning;
  err.truncated = false;
  std::vector<JSAMPLE> row;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return err.message;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
  jpeg_read_header(&cinfo, TRUE);
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = scale;
  cinfo.scale_denom = 8;
  cinfo.dct_method = JDCT_IFAST;  // TF's default (dct_method="")
  cinfo.do_fancy_upsampling = TRUE;  // TF's default (fancy_upscaling=True)
  jpeg_start_decompress(&cinfo);
  if (y < 0 || x < 0 || y + h > static_cast<int>(cinfo.output_height) ||
      x + w > static_cast<int>(cinfo.output_width)) {
    jpeg_destroy_decompress(&cinfo);
    return "window outside the " + std::to_string(cinfo.output_height) + "x" +
           std::to_string(cinfo.output_width) + " scaled frame";
  }
  // jpeg_crop_scanline widens the columns to whole iMCUs: remember how far x moved.
  JDIMENSION first_column = x, columns = w;
  if (w < static_cast<int>(cinfo.output_width)) jpeg_crop_scanline(&cinfo, &first_column, &columns);
  if (y > 0) jpeg_skip_scanlines(&cinfo, y);
  row.resize(static_cast<size_t>(columns) * 3);
  JSAMPROW row_pointer = row.data();
  const size_t shift = static_cast<size_t>(x - static_cast<int>(first_column)) * 3;
  for (int r = 0; r < h; ++r) {
    if (jpeg_read_scanlines(&cinfo, &row_pointer, 1) != 1 || err.truncated) {
      jpeg_destroy_decompress(&cinfo);
      return "truncated JPEG";
    }
    std::memcpy(out + static_cast<size_t>(r) * w * 3, row.data() + shift, static_cast<size_t>(w) * 3);
  }
  jpeg_abort_decompress(&cinfo);  // the rows below the window are not needed
  jpeg_destroy_decompress(&cinfo);
  return "";
}

class DecodeJpegScaledWindowOp : public OpKernel {
 public:
  explicit DecodeJpegScaledWindowOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const auto contents = context->input(0).vec<::tensorflow::tstring>();
    const auto window = context->input(1).vec<int32_t>();
    const int scale = context->input(2).scalar<int32_t>()();
    OP_REQUIRES(context, scale >= 1 && scale <= 16,
                ::tensorflow::errors::InvalidArgument("scale_eighths must be in 1..16, got ", scale));
    const int y = window(0), x = window(1), h = window(2), w = window(3);
    OP_REQUIRES(context, h > 0 && w > 0, ::tensorflow::errors::InvalidArgument("empty window"));
    const int64_t num_frames = contents.size();
    Tensor* frames = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({num_frames, h, w, 3}), &frames));
    uint8_t* out = frames->flat<uint8_t>().data();
    for (int64_t i = 0; i < num_frames; ++i) {
      const std::string why = DecodeWindow(contents(i), scale, y, x, h, w,
                                           out + i * static_cast<size_t>(h) * w * 3);
      OP_REQUIRES(context, why.empty(), ::tensorflow::errors::InvalidArgument("frame ", i, ": ", why));
    }
  }
};

REGISTER_KERNEL_BUILDER(Name("DecodeJpegScaledWindow").Device(::tensorflow::DEVICE_CPU),
                        DecodeJpegScaledWindowOp);

}  // namespace
