#!/usr/bin/env bash
# C++ compiler wrapper for building Horovod 0.28.1 against torch >= 2.1: rewrites Horovod's
# hard-wired -std=c++14 into -std=c++20, which torch's headers need.
args=()
for a in "$@"; do
  case "$a" in
    -std=c++14|-std=gnu++14|-std=c++17|-std=gnu++17) args+=("-std=c++20") ;;
    *) args+=("$a") ;;
  esac
done
exec "${REAL_CXX:-g++}" "${args[@]}"
