"""A real RTSP server on the loopback address for the tests and `sf-bench watch`: GStreamer's gst-rtsp-server
serving H.264 MPEG-TS clips (encoded by ffmpeg's libx264) at their own frame rate, one mount per clip, each
client from the clip's start. Run with the SYSTEM python, which has python3-gi (Debian: python3-gi,
gir1.2-gst-rtsp-server-1.0, gstreamer1.0-rtsp, gstreamer1.0-plugins-good and -bad):

    /usr/bin/python3 rtsp_server.py PORT NAME=CLIP.ts [NAME=CLIP.ts ...]

With RTSP_USER and RTSP_PASSWORD in the environment (never on the command line, where `ps` shows it) every mount
asks for them (basic auth). Prints "ready" once it listens; runs until killed.

From the venv, `start(port, mounts)` runs it and `clip(...)` encodes footage for it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"


def serve(port: int, mounts: dict) -> None:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    user, password = os.environ.get("RTSP_USER"), os.environ.get("RTSP_PASSWORD")
    if user:
        auth, token = GstRtspServer.RTSPAuth(), GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password or ""), token)
        server.set_auth(auth)
    for name, path in mounts.items():
        factory = GstRtspServer.RTSPMediaFactory()
        # In-band SPS/PPS before every key frame: a decoder follows a change of resolution mid-stream.
        factory.set_launch(f'( filesrc location="{path}" ! tsdemux ! h264parse ! '
                           f"rtph264pay name=pay0 pt=96 config-interval=-1 )")
        if user:
            perms = GstRtspServer.RTSPPermissions()
            perms.add_role_from_structure(Gst.Structure.from_string(
                "viewer, media.factory.access=(boolean)true, media.factory.construct=(boolean)true")[0])
            factory.set_permissions(perms)
        server.get_mount_points().add_factory(f"/{name}", factory)
    if not server.attach(None):
        sys.exit(f"rtsp_server: cannot listen on 127.0.0.1:{port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


def available() -> str | None:
    """None when the server can run here, else what is missing."""
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} is missing"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
                            "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
                            "assert all(Gst.ElementFactory.find(e) for e in ('tsdemux', 'h264parse', 'rtph264pay'))"],
                           capture_output=True, text=True)
    if probe.returncode:
        return ("GStreamer's RTSP server is not installed (apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 "
                "gstreamer1.0-rtsp gstreamer1.0-plugins-good gstreamer1.0-plugins-bad)")
    if not shutil.which("ffmpeg") or "libx264" not in subprocess.run(["ffmpeg", "-hide_banner", "-encoders"],
                                                                     capture_output=True, text=True).stdout:
        return "ffmpeg with libx264 is not installed (apt-get install ffmpeg)"
    return None


def start(port: int, mounts: dict, user: str | None = None, password: str | None = None) -> subprocess.Popen:
    """The server as a subprocess, listening once this returns; stop it with .kill()."""
    env = {**os.environ, **({"RTSP_USER": user, "RTSP_PASSWORD": password or ""} if user else {})}
    log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while it serves, and a full pipe would block it
    proc = subprocess.Popen([SYSTEM_PYTHON, __file__, str(port), *(f"{k}={v}" for k, v in mounts.items())],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    for line in proc.stdout:  # "ready" once it listens; the end of its output if it could not start
        if line.strip() == "ready":
            return proc
    proc.wait()
    log.seek(0)
    raise RuntimeError(f"rtsp_server on port {port} exited: {log.read().strip()[-500:]}")


def clip(out: Path, sources: list[tuple[str, int, int]], seconds: float, fps: int = 25) -> Path:
    """An H.264 MPEG-TS clip of `seconds`: the (video file, width, height) parts one after the other, each looped
    and scaled to its size (so a clip may change resolution mid-stream), one key frame a second. Encoded once;
    cached at `out`."""
    if out.exists():
        return out
    ffmpeg = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y"]
    parts = []
    for i, (path, w, h) in enumerate(sources):  # one encode per size, then joined without re-encoding
        part = out.with_name(f"{out.stem}.part{i}.ts")
        subprocess.run(ffmpeg + ["-stream_loop", "-1", "-t", f"{seconds / len(sources):.3f}", "-i", str(path),
                                 "-vf", f"fps={fps},scale={w}:{h},setsar=1", "-an", "-c:v", "libx264", "-preset",
                                 "veryfast", "-g", str(fps), "-pix_fmt", "yuv420p", "-f", "mpegts", str(part)],
                       check=True)
        parts.append(part)
    listing = out.with_name(f"{out.stem}.parts.txt")
    listing.write_text("".join(f"file '{p.resolve()}'\n" for p in parts))
    tmp = out.with_name(f"{out.stem}.tmp.ts")
    subprocess.run(ffmpeg + ["-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", "-f", "mpegts",
                             str(tmp)], check=True)
    for p in [*parts, listing]:
        p.unlink()
    tmp.rename(out)
    return out


if __name__ == "__main__":
    serve(int(sys.argv[1]), dict(arg.split("=", 1) for arg in sys.argv[2:]))
