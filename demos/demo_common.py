"""Pieces every demo tab shares: one-line error text and an image input whose bad uploads
end in a readable error. Not a tab itself (the hub's TABS never names it); the demos import
it as ``demo_common``: ``python demos/x.py`` puts demos/ on sys.path, and the hub's
load_demo() registers this file as ``sys.modules["demo_common"]`` before any tab (sys.path
left alone)."""
from __future__ import annotations


def one_line(err: BaseException) -> str:
    """The error's (or a message's) text on one line (the exception's type when it has none)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def serve(build, description: str, checkpoint_help: str = "", argv=None) -> None:
    """A demo on its own: ``--checkpoint`` (the tab's default), ``--port``, ``--host``; a
    checkpoint that does not load ends in one line (exit 2) before anything is served."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help=checkpoint_help or None)
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)
    try:
        demo = build(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        p.exit(2, f"{p.prog}: {one_line(err)}\n")
    demo.launch(server_name=args.host, server_port=args.port)


def image_input(kind: str, label: str = "image"):
    """gr.Image of ``kind`` ("pil", "numpy") whose undecodable uploads raise a one-line
    gr.Error naming the file, not gradio's bare "Error" (gradio decodes the upload before
    the tab's function runs, so the function cannot catch it). The wrapper goes on the
    instance: a gr.Image subclass would make gradio write a .pyi stub next to its file."""
    import gradio as gr
    from PIL import Image

    image = gr.Image(label=label, type=kind, image_mode="RGB")
    decode = image.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            name = getattr(payload, "orig_name", None) or "the upload"
            # the server's temp path is no use to the person at the browser: name their file
            why = one_line(str(err).replace(str(getattr(payload, "path", None) or name), name))
            raise gr.Error(f"cannot read {name} as an image: {why}") from None

    image.preprocess = preprocess
    return image
