// Turns each kernel's C++ signature into the emulator's table entry: its parameter kinds and
// sizes (checked against the PTX .param list at module load) and a function that runs one
// thread with the launch's argument bytes.
#pragma once

#include <type_traits>
#include <utility>

#include "emu.h"

namespace emu_thunk {

template <typename T>
emu::ParamInfo info() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>)
        return {emu::ParamKind::Pointer, sizeof(U)};
    else if constexpr (std::is_floating_point_v<U>)
        return {emu::ParamKind::Float, sizeof(U)};
    else if constexpr (std::is_integral_v<U> || std::is_enum_v<U>)
        return {emu::ParamKind::Integer, sizeof(U)};
    else
        return {emu::ParamKind::Aggregate, sizeof(U)};
}

template <typename FP, FP F>
struct Maker;

template <typename... A, void (*F)(A...)>
struct Maker<void (*)(A...), F> {
    template <size_t... I>
    static void call_i(void* const* args, std::index_sequence<I...>) {
        (void)args;
        F(*static_cast<std::remove_cv_t<A>*>(args[I])...);
    }
    static void call(void* const* args) { call_i(args, std::index_sequence_for<A...>{}); }
    static emu::KernelDef make(const char* name) { return emu::KernelDef{name, {info<A>()...}, &call}; }
};

}  // namespace emu_thunk

#define EMU_KERNEL(NAME) \
    ::emu_thunk::Maker<decltype(&emu_kernels::NAME), &emu_kernels::NAME>::make(#NAME)
