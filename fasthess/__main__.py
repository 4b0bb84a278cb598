"""``python -m fasthess``: print the loaded backend and the build information."""
from fasthess._ext import build_info


def main() -> None:
    info = build_info()
    print(f"fasthess {info['fasthess']}  backend: {info['backend']}")
    for key, value in info.items():
        if key not in ("fasthess", "backend") and value not in (None, []):
            print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
