# Sourced by the benchmarks: the images they share, built once per work
# directory (kept when it is reused).

# bench_alloc1g PATH: a 1 GiB qcow2, every cluster allocated.
bench_alloc1g() {
	[ -f "$1" ] && return
	qemu-img create -q -f qcow2 "$1" 1G
	qemu-io -c "write -P 0x5a 0 1G" "$1" >/dev/null
}

# bench_sparse1t PATH: a 1 TiB qcow2 with 16384 64 KiB writes at offsets
# from a fixed seed (one qemu-io process per 2048 writes).
bench_sparse1t() {
	[ -f "$1" ] && return
	qemu-img create -q -f qcow2 "$1" 1T
	local offs args i c
	mapfile -t offs < <(awk 'BEGIN{srand(1); for (i = 0; i < 16384; i++) printf "%d\n", int(rand()*16777216)}')
	for ((i = 0; i < 16384; i += 2048)); do
		args=()
		for c in "${offs[@]:i:2048}"; do args+=(-c "write -q -P 1 $((c * 65536)) 64k"); done
		qemu-io "${args[@]}" "$1" >/dev/null
	done
}
