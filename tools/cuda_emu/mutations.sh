#!/bin/bash
# Planted-bug suite: each line of mutations.txt is applied by gen_emu.py to the generated copy of one kernel (the
# repository's file is never touched), the kernel's harness (harnesses.txt) is built with ASan + UBSan and runs one
# section on the quick case lists; the harness must report a failing case or abort.
# Usage: tools/cuda_emu/mutations.sh [NAME...]   (all mutations by default; prints CAUGHT / MISSED per mutation,
# logs in build/cuda_emu/mutations/NAME/run.txt; exit status 1 if any was missed)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
EMU=$ROOT/tools/cuda_emu
KERNELS=$ROOT/csrc/kernels
OUT=$ROOT/build/cuda_emu/mutations
FLAGS=(-std=c++20 -O1 -g -fno-strict-aliasing -fsanitize=address,undefined -fno-sanitize-recover=undefined
       -Wno-unknown-pragmas -Wno-psabi -pthread -DBLOCKOPS_HAVE_CUTE -I "$EMU/fake" -I "$EMU" -I "$ROOT/csrc"
       -I "$KERNELS")
missed=0

# The harness of a kernel file: the first line of harnesses.txt that links or includes it (sets driver, linked,
# included: space-separated kernel names).
harness_of() {  # kernel file
  local kernel=${1%.cu} name link incl sections
  while IFS=$'\t' read -r name link incl sections; do
    case $name in '#'* | '') continue ;; esac
    [ "$link" = - ] && link=""
    [ "$incl" = - ] && incl=""
    if printf '%s\n' ${link//,/ } ${incl//,/ } | grep -qx "$kernel"; then
      driver=$name; linked=${link//,/ }; included=${incl//,/ }
      return 0
    fi
  done < "$EMU/harnesses.txt"
  return 1
}

run() {  # name kernel section from to
  local name=$1 file=$2 section=$3 from=$4 to=$5 dir=$OUT/$1 driver linked included k
  if ! harness_of "$file"; then
    echo "ERROR $name: no harness in harnesses.txt runs $file"; missed=1; return
  fi
  rm -rf "$dir" && mkdir -p "$dir"
  for k in $linked $included; do
    if [ "$k.cu" = "$file" ]; then
      python3 "$EMU/gen_emu.py" "$KERNELS/$k.cu" "$dir/${k}_emu.cpp" "$from" "$to" 2> "$dir/gen.txt" ||
        { echo "ANCHOR $name: $(tail -1 "$dir/gen.txt")"; missed=1; return; }
    else
      python3 "$EMU/gen_emu.py" "$KERNELS/$k.cu" "$dir/${k}_emu.cpp"
    fi
  done
  local srcs=()
  for k in $linked; do srcs+=("$dir/${k}_emu.cpp"); done
  g++ "${FLAGS[@]}" -I "$dir" "$EMU/$driver.cpp" "${srcs[@]}" -o "$dir/$driver" 2> "$dir/compile.txt" ||
    { echo "COMPILE $name (the mutation does not compile: $dir/compile.txt)"; missed=1; return; }
  local args=()
  [ "$section" != - ] && args=("$section")
  # In a subshell whose stderr is dropped: bash's own "Aborted" notice would interleave with the verdicts.
  (EMU_QUICK=1 timeout 900 "$dir/$driver" "${args[@]}" > "$dir/run.txt" 2>&1) 2> /dev/null
  local rc=$? fails
  fails=$(grep -c "^FAIL" "$dir/run.txt")
  if [ $rc -ne 0 ] || [ "$fails" -gt 0 ]; then
    local why
    why=$(grep -m1 -E "ERROR: |runtime error|smem race|mismatch|outside dynamic|not 16-byte|opt-in|hopper emu" "$dir/run.txt")
    why=${why:0:110}
    echo "CAUGHT $name: exit $rc, $fails failing cases${why:+; $why}"
  else
    echo "MISSED $name"; missed=1
  fi
}

while IFS=$'\t' read -r name file section from to; do
  case $name in '#'* | '') continue ;; esac
  if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qx "$name"; then continue; fi
  run "$name" "$file" "$section" "$(printf '%b' "$from")" "$(printf '%b' "$to")"
done < "$EMU/mutations.txt"
exit $missed
